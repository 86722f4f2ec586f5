"""The generalist: modality embedders -> packed encoder stream -> sparse-MoE encoder ->
sparse-MoE decoder (causal self-attention + cross-attention) -> tied text head, plus a
contrastive embedding head.

Shapes: S encoder tokens, T decoder tokens, B examples, N decoding rows (B x beams), M model dim,
V vocabulary, E contrastive dim.

Positions: every self-attention layer applies rotary embeddings over the token's index inside
its own example (encoder and decoder separately; cross-attention has none); non-text modality
tokens also get learned axial embeddings (time/row/column) from their embedder's coordinates.
Each example's encoder stream is: a learned task token, then for each segment an opening
boundary vector, the segment's tokens and a closing boundary vector (boundaries are learned per
modality).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generalist._fields import MissingFileError, check_count, read_json
from generalist.data.packing import EncodedExample, pack
from generalist.modalities import (MODALITIES, Prepared, TextTokenizer, build_embedders, cat_features,
                                   check_prepared)
from generalist.models.config import GeneralistConfig
from generalist.modules.blocks import DecoderBlock, EncoderBlock, StreamInfo, compile_block
from generalist.modules.moe import MoEStats
from generalist.ops import _attention_checks as checks
from generalist.ops import varlen_positions


class AxialPositions(nn.Module):
    def __init__(self, max_positions: tuple[int, int, int], d_model: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(max(1, n), d_model) for n in max_positions)
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.02)

    def forward(self, pos_L3: Tensor) -> Tensor:
        return sum(t(pos_L3[:, a]) for a, t in enumerate(self.tables))


@dataclass
class ModelOutput:
    loss: Tensor  # lm_loss + aux_loss
    lm_loss: Tensor  # mean over examples of each target's mean token cross-entropy
    aux_loss: Tensor
    logits: Tensor  # (T, V)
    labels: Tensor  # (T,)
    moe_stats: list[MoEStats]  # encoder layers, then decoder layers
    n_input_tokens: int  # S, the packed encoder stream's length


def _scalar_logit_scale(state_dict, prefix, *_):
    key = prefix + "logit_scale"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


class GeneralistModel(nn.Module):
    def __init__(self, cfg: GeneralistConfig):
        super().__init__()
        self.cfg = cfg
        m = cfg.d_model
        self.embedders = build_embedders(m, cfg.vocab_size, cfg.modalities)
        self.axial = nn.ModuleDict({name: AxialPositions(e.max_positions, m)
                                    for name, e in self.embedders.items() if name != "text"})
        self.task_emb = nn.Embedding(cfg.n_tasks, m)
        self.boundary = nn.Parameter(torch.randn(len(MODALITIES), 2, m) * 0.02)
        moe = cfg.moe_config(n_modalities=len(MODALITIES))
        self.encoder = nn.ModuleList(EncoderBlock(m, cfg.n_heads, cfg.n_kv_heads, moe, cfg.attention_backend)
                                     for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderBlock(m, cfg.n_heads, cfg.n_kv_heads, moe, cfg.attention_backend)
                                     for _ in range(cfg.dec_layers))
        self.enc_norm, self.dec_norm = nn.RMSNorm(m), nn.RMSNorm(m)
        self.embed_proj = nn.Linear(m, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))  # (1,): FSDP shards no scalar
        self._register_load_state_dict_pre_hook(_scalar_logit_scale)  # checkpoints saved when it was ()

    def compile_blocks(self, **options) -> "GeneralistModel":
        """Compiles every encoder and decoder block's forward with torch.compile, in place
        (`compile_block`: dynamic shapes, so a new stream length or batch size does not compile
        again; the parameter names, so checkpoints, stay as they are). The embedders, the losses
        and the decoding steps stay eager. `options` override BLOCK_COMPILE's arguments. Returns
        the model."""
        for block in (*self.encoder, *self.decoder):
            compile_block(block, **options)
        return self

    # ---- streams -------------------------------------------------------------------------
    def _stream(self, cu: Tensor, max_len: int, task_ids_T: Tensor, modality_ids_T: Tensor) -> StreamInfo:
        # built here from values checked on the host (pack's offsets, task ids checked against
        # n_tasks, modality ids from MODALITIES): the ops' value checks, a device sync each on a
        # GPU, skip them
        for t in (cu, task_ids_T, modality_ids_T):
            checks.trust_values(t)
        _, pos = varlen_positions(cu, task_ids_T.shape[0])
        s = StreamInfo(cu, max_len, pos.long(), task_ids_T, modality_ids_T)
        s.rotary(self.cfg.d_model // self.cfg.n_heads)  # made here, so compiled blocks find them made
        return s

    def embed_inputs(self, batch: list[EncodedExample]) -> tuple[Tensor, StreamInfo]:
        """Embeds every segment and packs all examples into one encoder stream (S, M). A segment's
        data is raw data or a `Prepared`. An empty batch gives an empty stream (S = 0)."""
        device = self.boundary.device
        if not batch:
            none = torch.zeros(0, dtype=torch.long, device=device)
            # no rows, but made from a weight, so it requires grad like any stream: the blocks' hooks
            # (FSDP's post-backward ones are registered on inputs that need a gradient) then fire
            # on every rank alike
            return (self.task_emb.weight[:0],
                    self._stream(torch.zeros(1, dtype=torch.int32, device=device), 0, none, none))
        # First every segment is checked and prepared where its data is (the parameter-free
        # part: patches, spectrograms), then each modality's segments are embedded together: one
        # projection and one axial lookup per modality, not one per segment (a training step on a
        # GPU is otherwise thousands of small kernels, and its host the bottleneck).
        n_tasks = self.cfg.n_tasks
        prepared = {name: [] for name in self.embedders}  # modality -> [(features, positions_L3)]
        for b, ex in enumerate(batch):
            if not ex.segments:
                raise ValueError(f"example {b} has no input segments")
            if not 0 <= ex.task_id < n_tasks:
                raise ValueError(f"example {b} has task id {ex.task_id}; this model has {n_tasks} tasks")
            for j, (modality, data) in enumerate(ex.segments):
                if modality not in self.embedders:
                    raise ValueError(f"example {b}: unknown modality {modality!r}; known: {list(self.embedders)}")
                try:
                    embedder = self.embedders[modality]
                    prepared[modality].append(check_prepared(embedder, data) if isinstance(data, Prepared)
                                              else embedder.prepare(data))
                except ValueError as error:
                    raise ValueError(f"example {b}, segment {j} ({modality}): {error}") from None
        toks, first = [], {}  # first[modality]: each of its segments' first row in cat(toks)
        n_tok = 0
        for modality, segs in prepared.items():
            if not segs:
                continue
            embedder = self.embedders[modality]
            tok_NM = embedder.project(cat_features([f for f, _ in segs], device))
            if modality != "text":
                tok_NM = tok_NM + self.axial[modality](cat_features([p for _, p in segs], device).to(device))
            toks.append(tok_NM)
            first[modality] = []
            for _, p in segs:
                first[modality].append(n_tok)
                n_tok += p.shape[0]
        # The learned rows (each example's task row, each segment's opening and closing boundary
        # rows) are looked up all at once, and the stream is put together by one gather: a row of
        # a parameter taken per use would cost, in the backward, a zero-filled copy of the whole
        # parameter and an add per use.
        # order[s] is the row of [every segment's tokens; the learned rows] that stream row s
        # takes: a token's, or -k for the k-th learned row (fixed up once the tokens are counted)
        learned, order, mods, tasks, cu = [], [], [], [], [0]
        seen = dict.fromkeys(prepared, 0)  # segments of each modality placed so far
        for ex in batch:
            learned.append(ex.task_id)
            order.append(-len(learned))
            mods.append(0)
            for modality, _ in ex.segments:
                mid = MODALITIES[modality]
                start = first[modality][seen[modality]]
                n = prepared[modality][seen[modality]][1].shape[0]
                seen[modality] += 1
                learned += [n_tasks + 2 * mid, n_tasks + 2 * mid + 1]  # rows of `table` below
                order += [1 - len(learned), *range(start, start + n), -len(learned)]
                mods += [mid] * (n + 2)
            tasks += [ex.task_id] * (len(order) - cu[-1])
            cu.append(len(order))
        order_S = torch.tensor(order)
        order_S = torch.where(order_S < 0, n_tok - 1 - order_S, order_S)  # -k: row n_tok + k - 1
        table = torch.cat([self.task_emb.weight, self.boundary.flatten(0, 1)])
        rows = torch.cat([*toks, F.embedding(torch.tensor(learned, device=device), table)])
        x_SM = rows.index_select(0, order_S.to(device))
        max_len = max(end - start for start, end in zip(cu, cu[1:]))
        ids = torch.tensor([tasks, mods], device=device)
        return x_SM, self._stream(torch.tensor(cu, dtype=torch.int32, device=device), max_len, ids[0], ids[1])

    def encode(self, batch: list[EncodedExample]) -> tuple[Tensor, StreamInfo, list[MoEStats]]:
        x_SM, enc = self.embed_inputs(batch)
        stats = []
        for block in self.encoder:
            x_SM, st = block(x_SM, enc)
            stats.append(st)
        return self.enc_norm(x_SM), enc, stats

    def decode(self, ids_T: Tensor, dec: StreamInfo, h_SM: Tensor, enc: StreamInfo):
        """Full (teacher-forced) decoder pass: logits (T, V)."""
        # the embedding table directly: ids_T packs many sequences (the text embedder's checks
        # are for one text), and _decoder_stream has checked them on the host
        x_TM = self.embedders["text"].embed(ids_T)
        stats = []
        for block in self.decoder:
            x_TM, st = block(x_TM, dec, h_SM, enc)
            stats.append(st)
        return self.dec_norm(x_TM) @ self.embedders["text"].weight.t(), stats

    def _decoder_stream(self, pieces: list[list[Tensor]], task_ids: list[int]) -> tuple[Tensor, StreamInfo]:
        """pieces[b]: the token id tensors that make sequence b, in order (as `pack` takes them)."""
        device = self.boundary.device
        if not pieces:
            none = torch.zeros(0, dtype=torch.long, device=device)
            return none, self._stream(torch.zeros(1, dtype=torch.int32, device=device), 0, none, none)
        ids_T, cu, max_len = pack(pieces)
        text = self.embedders["text"].cfg
        if max_len > text.max_len:
            raise ValueError(f"a decoder sequence has {max_len} tokens; the text embedder's max_len is {text.max_len}")
        if ids_T.numel():
            lo, hi = torch.stack(torch.aminmax(ids_T)).tolist()  # on the host for batches from the data path
            if lo < 0 or hi >= text.vocab_size:
                raise ValueError(f"target token ids must be in [0, {text.vocab_size}); got min {lo}, max {hi}")
        lens = torch.tensor([sum(p.shape[0] for p in seq) for seq in pieces])
        tasks = torch.repeat_interleave(torch.tensor(task_ids, dtype=torch.long), lens)
        return ids_T.to(device), self._stream(cu.to(device), max_len, tasks.to(device),
                                              torch.zeros_like(tasks).to(device))

    def _teacher_forced(self, targets: list[Tensor], task_ids: list[int]) -> tuple[Tensor, StreamInfo, Tensor]:
        """The decoder stream of `targets` (token ids, no bos or eos) read teacher-forced: inputs
        (bos, target) and labels (target, eos) of each, each packed by one concatenation on the
        host (not two small tensors and a concatenation per target). -> (ids_T, stream, labels_T
        on the host)."""
        bos_1, eos_1 = torch.tensor([self.cfg.bos_id]), torch.tensor([self.cfg.eos_id])
        targets = [t.long() for t in targets]
        labels = torch.cat([t for tgt in targets for t in (tgt, eos_1)] or [eos_1[:0]])
        ids_T, dec = self._decoder_stream([[bos_1, tgt] for tgt in targets], task_ids)
        return ids_T, dec, labels

    # ---- training --------------------------------------------------------------------------
    def forward(self, batch: list[EncodedExample]) -> ModelOutput:
        """Losses over `batch`. An empty batch runs every layer on zero tokens and gives zero
        losses that still depend on every block (so a process with nothing to do takes part in
        the exchanges of expert parallelism, forward and backward, like the others)."""
        h_SM, enc, enc_stats = self.encode(batch)
        ids_T, dec, labels = self._teacher_forced([ex.target_ids for ex in batch], [ex.task_id for ex in batch])
        logits_TV, dec_stats = self.decode(ids_T, dec, h_SM, enc)
        labels = labels.to(logits_TV.device)
        # each example counts once, whatever its target's length: a caption's dozen tokens must
        # not outweigh a class name's two (the mean of per-example token means)
        lens = [len(ex.target_ids) + 1 for ex in batch]
        lens_B = torch.tensor(lens, dtype=torch.long, device=logits_TV.device)
        weight_T = torch.repeat_interleave(1.0 / (lens_B * len(batch)), lens_B, output_size=sum(lens))  # (no sync)
        lm_loss = (F.cross_entropy(logits_TV.float(), labels, reduction="none") * weight_T).sum()
        stats = enc_stats + dec_stats
        aux = sum((s.aux_loss for s in stats), torch.zeros((), device=logits_TV.device))
        return ModelOutput(lm_loss + aux, lm_loss, aux, logits_TV, labels, stats, h_SM.shape[0])

    def answer_logprobs(self, example: EncodedExample, targets: list[Tensor], batch_size: int = 64) -> Tensor:
        """(N,) float32: the log-probability the decoder gives each of `targets` (token ids, no
        bos or eos) as the whole answer to `example` (its tokens, then eos), the inputs encoded
        once: each target's decoder reads its own copy of the one encoding."""
        check_count("batch_size", batch_size)
        h_SM, enc, _ = self.encode([example])
        S, out = h_SM.shape[0], []
        for i in range(0, len(targets), batch_size):
            chunk = targets[i:i + batch_size]
            n = len(chunk)
            cu = torch.arange(n + 1, dtype=torch.int32, device=h_SM.device) * S
            copies = self._stream(cu, S, enc.task_ids.repeat(n), enc.modality_ids.repeat(n))
            ids_T, dec, labels_T = self._teacher_forced(chunk, [example.task_id] * n)
            logits_TV, _ = self.decode(ids_T, dec, h_SM.repeat(n, 1), copies)
            labels_T = labels_T.to(logits_TV.device)
            logp_T = torch.log_softmax(logits_TV.float(), dim=-1).gather(1, labels_T[:, None])[:, 0]
            out += [part.sum() for part in logp_T.split([len(t) + 1 for t in chunk])]
        return torch.stack(out) if out else torch.zeros(0, device=h_SM.device)

    def embed(self, batch: list[EncodedExample]) -> Tensor:
        """Unit-norm (B, E) embeddings: the mean of each example's encoder tokens, projected.
        An empty batch gives (0, E), after running the encoder on zero tokens."""
        h_SM, enc, _ = self.encode(batch)
        seq_S = torch.repeat_interleave(torch.arange(len(batch), device=h_SM.device),
                                        (enc.cu_seqlens[1:] - enc.cu_seqlens[:-1]).long())
        pooled_BM = torch.zeros(len(batch), h_SM.shape[1], device=h_SM.device, dtype=h_SM.dtype)
        pooled_BM.index_add_(0, seq_S, h_SM)
        pooled_BM = pooled_BM / (enc.cu_seqlens[1:] - enc.cu_seqlens[:-1])[:, None].to(h_SM.dtype)
        return F.normalize(self.embed_proj(pooled_BM).float(), dim=-1)  # unit norm in fp32, autocast or not

    def contrastive_loss(self, a_BE: Tensor, b_BE: Tensor) -> Tensor:
        """Symmetric InfoNCE between paired embeddings (row i of a matches row i of b)."""
        logits = self.logit_scale.exp().clamp(max=100) * a_BE @ b_BE.t()
        target = torch.arange(a_BE.shape[0], device=a_BE.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2

    # ---- checkpoints ----------------------------------------------------------------------
    def save(self, directory: str | Path, tokenizer: TextTokenizer | None = None,
             state_dict: dict[str, Tensor] | None = None) -> None:
        """config.json + model.safetensors (+ tokenizer.json): no pickled code anywhere.
        state_dict: full weights to write in place of this module's own (an expert-parallel
        rank holds only some experts; the checkpoint is always the single-device model)."""
        from safetensors.torch import save_file, save_model

        directory = Path(directory)
        bad = _non_finite(self.state_dict() if state_dict is None else state_dict)
        if bad:  # a checkpoint that cannot predict anything must not replace one that can
            raise FloatingPointError(f"refusing to save non-finite weights ({bad})")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        if state_dict is None:
            save_model(self, str(directory / "model.safetensors"))
        else:
            mine = self.state_dict()
            if state_dict.keys() != mine.keys():
                raise ValueError(f"state_dict keys differ from the model's: {sorted(set(state_dict) ^ set(mine))[:5]}")
            save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(directory / "model.safetensors"),
                      metadata={"format": "pt"})
        if tokenizer is not None:
            if tokenizer.vocab_size != self.cfg.vocab_size:
                raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model {self.cfg.vocab_size}")
            (directory / "tokenizer.json").write_text(tokenizer.to_json())

    @staticmethod
    def load_tokenizer(directory: str | Path) -> TextTokenizer:
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise MissingFileError(f"{directory} has no tokenizer.json")
        try:
            return TextTokenizer.from_json(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:  # a file cut short or damaged: named
            raise ValueError(f"{path}: {error}") from None

    @classmethod
    def load(cls, directory: str | Path, device="cpu") -> "GeneralistModel":
        from safetensors.torch import load_model

        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise MissingFileError(f"{directory} is not a generalist checkpoint: {name} is missing")
        config = directory / "config.json"
        cfg = GeneralistConfig.from_dict(read_json(config), f"{config}: ")
        try:
            model = cls(cfg)
        except ValueError as error:  # fields of the right types that build nothing (a modality's unknown key)
            raise ValueError(f"{config}: {error}") from None
        weights = directory / "model.safetensors"
        stored = _stored_float_dtype(weights)
        if stored is not None:  # weights saved in one other floating dtype come back in it, exactly
            model.to(stored)
        try:
            load_model(model, str(weights), device=str(device))
        except Exception as error:  # safetensors' own errors (a damaged file) and a shape mismatch (RuntimeError)
            lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
            reason = next((line for line in lines if "mismatch" in line or line.startswith(("Missing", "Unexpected"))),
                          lines[0])
            raise ValueError(f"cannot load {weights}: it is damaged or does not match {config.name} ({reason})") from None
        bad = _non_finite(model.state_dict())
        if bad:
            raise ValueError(f"{weights} holds non-finite weights ({bad}): the run that saved it diverged")
        return model.to(device)


_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _stored_float_dtype(path: Path) -> torch.dtype | None:
    """The one floating dtype of every floating tensor in a safetensors file, or None when that is
    fp32, when they differ, or when the file cannot be read (load then says why)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    except Exception:  # a damaged file: the load that follows names it
        return None
    floats = {_SAFETENSORS_FLOATS[d] for d in dtypes if d in _SAFETENSORS_FLOATS}
    return floats.pop() if len(floats) == 1 and floats != {torch.float32} else None


def _non_finite(state: dict[str, Tensor]) -> str:
    """The names of the floating-point tensors of `state` that hold NaN or inf (the first three),
    or "" when there are none."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
