import pytest
import torch

from generalist.data.packing import Example, ExampleEncoder, pack


class _Chars:
    def encode(self, text):
        return [ord(c) for c in text]


def test_pack_builds_cu_seqlens_without_padding():
    a, b, c = torch.ones(3, 2), torch.zeros(0, 2), torch.full((4, 2), 2.0)
    flat, cu, max_len = pack([[a, b], [c], [b]])
    assert cu.tolist() == [0, 3, 7, 7] and cu.dtype == torch.int32 and max_len == 4
    assert torch.equal(flat, torch.cat([a, c]))


def test_encoder_tokenizes_text_and_maps_tasks():
    enc = ExampleEncoder(_Chars(), ["a", "b"])
    ex = enc.encode(Example([("text", "hi"), ("image", torch.zeros(1, 4, 4))], "ok", "b"))
    assert ex.task_id == 1 and ex.segments[0][1].tolist() == [104, 105] and ex.target_ids.tolist() == [111, 107]
    assert torch.equal(ex.segments[1][1], torch.zeros(1, 4, 4))


@pytest.mark.parametrize("example,match", [
    (Example([("text", "x")], "", "c"), "unknown task 'c'"),
    (Example([], "", "a"), "no input segments"),
    (Example([("smell", 1)], "", "a"), "unknown modality 'smell'"),
    (Example([("text", 3)], "", "a"), "must be a str"),
    (Example([("text", "")], "", "a"), "text segment 0 is empty"),
    (Example(["text"], "", "a"), r"must be a \(modality, data\) pair"),
])
def test_encoder_errors(example, match):
    with pytest.raises(ValueError, match=match):
        ExampleEncoder(_Chars(), ["a", "b"]).encode(example)


def test_pack_of_nothing_is_named():
    with pytest.raises(ValueError, match="pack needs at least one tensor, got 0 examples holding none"):
        pack([])
    with pytest.raises(ValueError, match="got 2 examples holding none"):
        pack([[], []])
