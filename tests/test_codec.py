"""pipeline.codec: exact pcm16, bounded-error linear-N and mu-law, identical numpy and torch."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from pipeline.codec import CodecError, get_codec, int16_to_pcm16, pcm16_to_int16
from pipeline.errors import PipelineError

ALL_U16 = np.arange(65536, dtype=np.uint16)
INT16 = ALL_U16.astype(np.int64) - 32768
LOSSY = ["mulaw", "mulaw10", "linear8", "linear12"]


def _error(spec: str) -> np.ndarray:
    """|decode(encode(u)) - u| in int16 units for every one of the 65536 sample values."""
    codec = get_codec(spec)
    return np.abs(codec.decode(codec.encode(ALL_U16)).astype(np.int64) - ALL_U16)


def test_pcm16_is_exact_on_every_sample_value():
    codec = get_codec("pcm16")
    tokens = codec.encode(ALL_U16)
    assert tokens.dtype == np.int64 and np.array_equal(tokens, ALL_U16)
    decoded = codec.decode(tokens)
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, ALL_U16)


def test_pcm16_is_exact_in_torch():
    torch = pytest.importorskip("torch")
    codec = get_codec("pcm16")
    tokens = codec.encode(torch.from_numpy(ALL_U16))
    assert tokens.dtype == torch.int64 and np.array_equal(tokens.numpy(), ALL_U16)
    decoded = codec.decode(tokens)
    assert decoded.dtype == torch.int32 and np.array_equal(decoded.numpy(), ALL_U16)


@pytest.mark.parametrize("spec", LOSSY)
def test_decode_then_encode_returns_every_reachable_code(spec):
    codec = get_codec(spec)
    reachable = np.zeros(codec.levels, dtype=bool)
    reachable[codec.encode(ALL_U16)] = True
    assert np.array_equal(reachable, codec.reachable())
    codes = np.arange(codec.levels)
    again = codec.encode(codec.decode(codes))
    assert np.array_equal(again[reachable], codes[reachable])
    # An unreachable code (tiny mu-law bins near zero) lands on a neighbour, never far away.
    assert np.all(np.abs(again - codes) <= 1)


def test_only_fine_mulaw_has_unreachable_codes_and_only_near_zero():
    assert get_codec("mulaw8").reachable().all()
    assert get_codec("linear12").reachable().all()
    reachable = get_codec("mulaw10").reachable()
    unreachable = np.flatnonzero(~reachable)
    assert 0 < unreachable.size < 64
    assert np.all(np.abs(unreachable - 511.5) < 64)  # codes 511/512 straddle zero


@pytest.mark.parametrize("spec", ["linear8", "linear12"])
def test_linear_error_is_at_most_half_a_bin(spec):
    half_bin = 1 << (16 - get_codec(spec).bits - 1)
    assert _error(spec).max() == half_bin


@pytest.mark.parametrize("spec", ["mulaw", "mulaw10"])
def test_mulaw_error_is_within_half_the_local_bin(spec):
    mu = get_codec(spec).levels - 1
    # The wider (outer) half of the bin around |x|: (1/mu + |x|)(e^(ln(1+mu)/mu) - 1), in int16
    # units, plus 1 for rounding the decoded value to an integer.
    growth = math.expm1(math.log1p(mu) / mu)
    bound = (1 / mu + np.abs(INT16) / 32768) * growth * 32768 + 1
    assert np.all(_error(spec) <= bound)


def test_mulaw8_error_is_small_near_zero_and_grows_with_amplitude():
    err, amp = _error("mulaw"), np.abs(INT16)
    assert err[amp < 64].max() <= 4
    assert err[amp < 1024].max() < err[(amp >= 1024) & (amp < 8192)].max()
    assert err[(amp >= 1024) & (amp < 8192)].max() < err[amp >= 16384].max() <= 0.022 * 32768 + 4


@pytest.mark.parametrize("spec", ["pcm16", *LOSSY])
def test_numpy_and_torch_agree_on_every_sample_and_code(spec):
    torch = pytest.importorskip("torch")
    codec = get_codec(spec)
    tokens = codec.encode(ALL_U16)
    for samples in (torch.from_numpy(ALL_U16), torch.from_numpy(ALL_U16.astype(np.int32))):
        torch_tokens = codec.encode(samples)
        assert torch_tokens.dtype == torch.int64
        assert np.array_equal(torch_tokens.numpy(), tokens)
    codes = np.arange(codec.levels)
    torch_decoded = codec.decode(torch.from_numpy(codes))
    assert torch_decoded.dtype == torch.int32
    assert np.array_equal(torch_decoded.numpy(), codec.decode(codes))


def test_shape_is_kept_and_empty_input_works():
    codec = get_codec("mulaw")
    chunk = ALL_U16[:2048].reshape(2, 1024)
    assert codec.encode(chunk).shape == (2, 1024)
    assert codec.decode(codec.encode(chunk)).shape == (2, 1024)
    assert codec.encode(np.zeros((2, 0), np.uint16)).shape == (2, 0)


@pytest.mark.parametrize(
    ("spec", "name", "levels"),
    [
        ("pcm16", "pcm16", 65536),
        ("mulaw", "mulaw8", 256),
        ("mulaw:10", "mulaw10", 1024),
        (" MuLaw2 ", "mulaw2", 4),
        ("linear12", "linear12", 4096),
        ("linear:1", "linear1", 2),
        ("linear16", "linear16", 65536),
    ],
)
def test_specs_parse_to_canonical_names(spec, name, levels):
    codec = get_codec(spec)
    assert (codec.name, codec.levels, codec.bits) == (name, levels, levels.bit_length() - 1)


@pytest.mark.parametrize(
    "spec", ["", "pcm", "pcm8", "mulaw1", "mulaw17", "linear0", "linear:17", "mu-law", "linear"]
)
def test_bad_specs_raise_one_line_listing_the_valid_forms(spec):
    with pytest.raises(ValueError, match="pcm16, mulaw") as info:
        get_codec(spec)
    assert isinstance(info.value, PipelineError) and "\n" not in str(info.value)


def test_out_of_range_values_are_refused():
    codec = get_codec("mulaw")
    with pytest.raises(CodecError, match=r"0\.\.255, got values in 0\.\.256"):
        codec.decode(np.array([0, 256]))
    with pytest.raises(CodecError, match=r"0\.\.255"):
        codec.decode(np.array([-100, 3]))
    with pytest.raises(CodecError, match=r"0\.\.65535"):
        codec.encode(np.array([65536], dtype=np.int32))
    with pytest.raises(CodecError, match="integers"):
        codec.encode(np.array([0.5]))


def test_out_of_range_tensors_are_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(CodecError, match=r"0\.\.255"):
        get_codec("mulaw").decode(torch.tensor([1, -100]))
    with pytest.raises(CodecError, match=r"0\.\.65535"):
        get_codec("pcm16").encode(torch.tensor([70000]))
    with pytest.raises(CodecError, match="integers"):
        get_codec("linear8").encode(torch.tensor([1.0]))


def test_int16_pcm16_helpers_are_the_original_plus_32768():
    assert np.array_equal(pcm16_to_int16(ALL_U16), INT16)
    assert pcm16_to_int16(ALL_U16).dtype == np.int16
    assert np.array_equal(int16_to_pcm16(INT16.astype(np.int16)), ALL_U16)
    torch = pytest.importorskip("torch")
    assert np.array_equal(pcm16_to_int16(torch.from_numpy(ALL_U16)).numpy(), INT16)
    assert np.array_equal(int16_to_pcm16(torch.from_numpy(INT16.astype(np.int16))).numpy(), ALL_U16)


def test_importing_the_codec_does_not_import_torch():
    code = "import pipeline.codec, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
