"""The model's configuration and its named presets (one registry; no fuzzy lookup)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from generalist._fields import check_keys, check_types


@dataclass
class GeneralistConfig:
    vocab_size: int
    n_tasks: int = 1
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    enc_layers: int = 2
    dec_layers: int = 2
    d_ff: int = 128  # hidden size of each expert
    n_shared: int = 1  # always-on experts per MoE
    n_routed: int = 4  # routed experts per MoE (0: a dense FFN)
    top_k: int = 2
    condition_router: bool = True  # the router sees task and modality embeddings
    capacity_factor: float | None = None  # None: dropless
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    embed_dim: int = 64  # contrastive embedding size
    bos_id: int = 0
    eos_id: int = 1
    attention_backend: str = "auto"
    modalities: dict = field(default_factory=dict)  # per-modality config overrides, e.g. {"image": {"patch": 4}}

    def __post_init__(self):
        check_types(self, "model config: ")
        for name in ("n_tasks", "d_model", "n_heads", "n_kv_heads", "dec_layers", "d_ff", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.enc_layers < 0:
            raise ValueError(f"model config: enc_layers must be >= 0, got {self.enc_layers}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        for name in ("bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} must be a token id below vocab_size ({self.vocab_size})")
        from generalist.ops._attention_checks import MAX_HEAD_DIM
        from generalist.ops.attention import BACKENDS

        # rotary turns pairs of channels: a head of one channel would see no positions at all
        if not 2 <= self.d_model // self.n_heads <= MAX_HEAD_DIM:
            raise ValueError(f"model config: the head dim d_model / n_heads = {self.d_model // self.n_heads} must be "
                             f"in [2, {MAX_HEAD_DIM}] (the attention kernels' range)")
        try:
            BACKENDS.check_name(self.attention_backend)
            self.moe_config(n_modalities=1)
        except ValueError as error:
            raise ValueError(f"model config: {error}") from None

    def moe_config(self, n_modalities: int):
        """The MoE layers' configuration (generalist.modules.moe.MoEConfig, which checks it)."""
        from generalist.modules.moe import MoEConfig

        return MoEConfig(d_model=self.d_model, d_ff=self.d_ff, n_shared=self.n_shared, n_routed=self.n_routed,
                         top_k=self.top_k, n_tasks=self.n_tasks, n_modalities=n_modalities,
                         condition_router=self.condition_router, capacity_factor=self.capacity_factor,
                         aux_loss_weight=self.aux_loss_weight, z_loss_weight=self.z_loss_weight)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "") -> "GeneralistConfig":
        """From `to_dict`'s output (a checkpoint's config.json); a ValueError names `where` and
        the first field that is unknown, missing or of the wrong type."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}expected a JSON object of model fields, got {type(values).__name__}")
        check_keys(cls, values, where)
        if "vocab_size" not in values:
            raise ValueError(f"{where}vocab_size is missing")
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{where}{error}") from None


# name -> fields; vocab_size and n_tasks come from the tokenizer and the task mixture.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=32, n_heads=4, n_kv_heads=2, enc_layers=1, dec_layers=1, d_ff=32, n_shared=1,
                 n_routed=4, top_k=2, embed_dim=16),
    "demo": dict(d_model=128, n_heads=4, n_kv_heads=2, enc_layers=3, dec_layers=2, d_ff=256, n_shared=1,
                 n_routed=8, top_k=2, embed_dim=64,
                 modalities={"image": {"patch": 7}, "video": {"patch": 8, "tubelet_time": 8}}),
    "base": dict(d_model=512, n_heads=8, n_kv_heads=4, enc_layers=8, dec_layers=6, d_ff=1024, n_shared=2,
                 n_routed=32, top_k=2, embed_dim=256),
}


def preset(name: str, vocab_size: int, n_tasks: int = 1, **overrides) -> GeneralistConfig:
    """The preset's config with `overrides` replacing its fields, but for `modalities`, which is
    merged: {"audio": {"patch_time": 8}} changes that one field of the audio config and keeps the
    preset's others (demo's image and video patches among them); None leaves a modality out."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    check_keys(GeneralistConfig, overrides, "model: ")
    fields = dict(PRESETS[name])
    given = overrides.get("modalities")
    if isinstance(given, dict):  # (anything else is refused by the config's own check)
        ours = fields.get("modalities", {})
        overrides = {**overrides, "modalities": {**ours, **{
            m: {**ours[m], **v} if isinstance(v, dict) and isinstance(ours.get(m), dict) else v
            for m, v in given.items()}}}
    return replace(GeneralistConfig(vocab_size=vocab_size, n_tasks=n_tasks, **fields), **overrides)
