"""The latent alignment W_a (selar_local/alignment.py): exact checks on small GGUF tables
written here, the tied case on a real model, the cache and the errors."""
from __future__ import annotations

import numpy as np
import pytest

from selar_local import alignment as al
from selar_local.alignment import (ALIGN_LAMBDA, TensorRows, alignment_sources, cache_file, compute_ridge,
                                   load_alignment)
from selar_local.download import file_sha256
from selar_local.errors import InvalidParameterError, UnsupportedModelError
from selar_local.gguf_index import GGUFIndex

F32_EPS = float(np.finfo(np.float32).eps)


def write_tables(path, tables: dict[str, np.ndarray], arch: str = "llama", qtype=None):
    """A GGUF file holding only these [n_vocab, width] tables (float32, or quantised to qtype)."""
    from gguf import GGUFWriter
    from gguf.quants import quantize

    writer = GGUFWriter(str(path), arch)
    for name, table in tables.items():
        if qtype is None:
            writer.add_tensor(name, table.astype(np.float32))
        else:
            writer.add_tensor(name, quantize(table.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def ridge_by_lstsq(w_out: np.ndarray, w_in: np.ndarray, lam: float) -> np.ndarray:
    """The ridge solution as an ordinary least-squares problem on the augmented system
    [W_out; sqrt(lam) I] W = [W_in; 0], solved by numpy's lstsq in float64."""
    d = w_out.shape[1]
    a = np.vstack([w_out.astype(np.float64), np.sqrt(lam) * np.eye(d)])
    b = np.vstack([w_in.astype(np.float64), np.zeros((d, w_in.shape[1]))])
    return np.linalg.lstsq(a, b, rcond=None)[0]


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SELAR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def untied(tmp_path):
    rng = np.random.default_rng(7)
    w_in = rng.standard_normal((300, 16)).astype(np.float32)
    mixing = np.eye(16) + 0.1 * rng.standard_normal((16, 16))  # well conditioned: cond(G) ~ 4
    w_out = (w_in @ mixing + 0.1 * rng.standard_normal((300, 16))).astype(np.float32)
    path = write_tables(tmp_path / "untied.gguf", {"token_embd.weight": w_in, "output.weight": w_out})
    return path, w_out, w_in


class TestRidge:
    def test_matches_a_direct_least_squares_solve_with_blocks_of_any_size(self, untied):
        path, w_out, w_in = untied
        expected = ridge_by_lstsq(w_out, w_in, ALIGN_LAMBDA)
        index = GGUFIndex(path)
        cond = np.linalg.cond(w_out.astype(np.float64).T @ w_out)
        assert cond < 10
        for block_rows in (7, 60, 300, 1000):  # a last short block, exact division, one block, more than all
            # The sums across blocks and the solve are float64; what remains is each block's
            # float32 products (k terms a dot product, rounding ~ sqrt(k) eps relative),
            # amplified by cond(G), and the final rounding to float32.
            k = min(block_rows, 300)
            tolerance = 4 * (np.sqrt(k) * cond + 1) * F32_EPS * np.abs(expected).max()
            matrix, norm = compute_ridge(TensorRows(index, "output.weight"), TensorRows(index, "token_embd.weight"),
                                         block_rows=block_rows)
            assert matrix.dtype == np.float32 and matrix.shape == (16, 16)
            np.testing.assert_allclose(matrix, expected, rtol=0, atol=tolerance)
            assert norm == pytest.approx(np.linalg.norm(w_in.astype(np.float64), axis=1).mean(), rel=1e-6)

    def test_lambda_is_the_ridge_weight(self, untied, tmp_path):
        path, w_out, w_in = untied
        index = GGUFIndex(path)
        strong, _ = compute_ridge(TensorRows(index, "output.weight"), TensorRows(index, "token_embd.weight"), lam=50.0)
        np.testing.assert_allclose(strong, ridge_by_lstsq(w_out, w_in, 50.0), rtol=0, atol=1e-5)
        assert np.abs(strong - ridge_by_lstsq(w_out, w_in, ALIGN_LAMBDA)).max() > 1e-2  # 50 does matter here
        # A hidden coordinate the output table never uses: G is singular, the ridge term keeps
        # the solve finite and maps that coordinate to nothing.
        degenerate = w_out.copy()
        degenerate[:, 5] = 0.0
        path = write_tables(tmp_path / "degenerate.gguf", {"token_embd.weight": w_in, "output.weight": degenerate})
        index = GGUFIndex(path)
        matrix, _ = compute_ridge(TensorRows(index, "output.weight"), TensorRows(index, "token_embd.weight"))
        assert np.isfinite(matrix).all() and not matrix[5].any()
        np.testing.assert_allclose(matrix, ridge_by_lstsq(degenerate, w_in, ALIGN_LAMBDA), rtol=0, atol=1e-4)

    def test_the_map_sends_output_rows_to_input_rows_as_well_as_least_squares_can(self, untied):
        path, w_out, w_in = untied
        matrix, _ = compute_ridge(*(TensorRows(GGUFIndex(path), n) for n in ("output.weight", "token_embd.weight")))
        residual = np.linalg.norm(w_out @ matrix - w_in)
        best = np.linalg.norm(w_out @ ridge_by_lstsq(w_out, w_in, 0.0) - w_in)
        assert residual == pytest.approx(best, rel=1e-4)
        assert residual < 0.5 * np.linalg.norm(w_in)  # the map explains most of the input table

    def test_quantised_tables_are_dequantised_as_gguf_reads_them(self, tmp_path):
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quantize

        rng = np.random.default_rng(3)
        w_in = rng.standard_normal((256, 32)).astype(np.float32)
        w_out = rng.standard_normal((256, 32)).astype(np.float32)
        q8 = GGMLQuantizationType.Q8_0
        path = write_tables(tmp_path / "q8.gguf", {"token_embd.weight": w_in, "output.weight": w_out}, qtype=q8)
        deq_out, deq_in = (dequantize(quantize(w, q8), q8) for w in (w_out, w_in))
        index = GGUFIndex(path)
        blocks = np.vstack([rows for _, rows in TensorRows(index, "output.weight").blocks(100)])
        assert np.array_equal(blocks, deq_out)
        matrix, _ = compute_ridge(TensorRows(index, "output.weight"), TensorRows(index, "token_embd.weight"))
        np.testing.assert_allclose(matrix, ridge_by_lstsq(deq_out, deq_in, ALIGN_LAMBDA), rtol=0, atol=1e-4)


class TestTied:
    def test_a_tied_table_aligns_to_the_identity_up_to_lambda(self, tmp_path, cache_home):
        rng = np.random.default_rng(11)
        table = rng.standard_normal((500, 24)).astype(np.float32)
        path = write_tables(tmp_path / "tied.gguf", {"token_embd.weight": table})
        assert alignment_sources(GGUFIndex(path)).tied
        alignment = load_alignment(path)
        assert alignment.tied and alignment.kind == "ridge"
        gram = table.astype(np.float64).T @ table
        # W_a = I - lam (G + lam I)^-1 exactly, so |W_a - I| <= lam / lambda_min(G), plus rounding.
        bound = ALIGN_LAMBDA / np.linalg.eigvalsh(gram).min() + 32 * np.linalg.cond(gram) * F32_EPS
        assert np.abs(alignment.matrix - np.eye(24)).max() <= bound

    def test_a_real_tied_model_aligns_to_the_identity(self, smollm_path, cache_home):
        index = GGUFIndex(smollm_path)
        assert "output.weight" not in index.tensors  # SmolLM2 ties its output to token_embd
        alignment = load_alignment(smollm_path)
        assert alignment.tied and alignment.matrix.shape == (576, 576)
        # measured 1.8e-7 (SmolLM2-135M Q8_0 table: lambda_min(G) ~ 40, so the ridge term
        # is ~3e-7 and the float32 products add less)
        assert np.abs(alignment.matrix - np.eye(576)).max() < 1e-5
        assert alignment.input_scale == 1.0 and alignment.target_norm > 0


class TestIdentityAndScale:
    def test_identity_rescales_to_the_mean_input_norm(self, untied, cache_home):
        path, _, w_in = untied
        alignment = load_alignment(path, "identity")
        assert alignment.kind == "identity" and alignment.matrix is None
        target = float(np.linalg.norm(w_in.astype(np.float64), axis=1).mean())
        assert alignment.target_norm == pytest.approx(target, rel=1e-6)
        hidden = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
        fed = alignment.apply(hidden)
        np.testing.assert_allclose(np.linalg.norm(fed, axis=1), target, rtol=1e-6)
        np.testing.assert_allclose(fed / np.linalg.norm(fed, axis=1, keepdims=True),
                                   hidden / np.linalg.norm(hidden, axis=1, keepdims=True), atol=1e-6)

    def test_gemma_gets_its_sqrt_n_embd_input_scale_on_top(self, tmp_path, cache_home):
        table = np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32)
        path = write_tables(tmp_path / "gemma.gguf", {"token_embd.weight": table}, arch="gemma3")
        alignment = load_alignment(path)
        assert alignment.input_scale == pytest.approx(4.0)
        fed = alignment.apply(np.ones(16, dtype=np.float32))
        assert np.linalg.norm(fed) == pytest.approx(4.0 * alignment.target_norm, rel=1e-6)


class TestCache:
    def test_miss_then_hit_then_a_damaged_file_is_recomputed(self, untied, cache_home, monkeypatch):
        path, _, _ = untied
        target = cache_file(file_sha256(path), "ridge", ALIGN_LAMBDA)
        assert not target.exists()
        first = load_alignment(path)
        assert target.is_file()
        computed = []
        real = al.compute_ridge
        monkeypatch.setattr(al, "compute_ridge", lambda *a, **k: computed.append(1) or real(*a, **k))
        hit = load_alignment(path)
        assert computed == [] and np.array_equal(hit.matrix, first.matrix) and hit.target_norm == first.target_norm
        for damage in (b"", b"not a zip file", target.read_bytes()[: target.stat().st_size // 2]):
            target.write_bytes(damage)
            again = load_alignment(path)
            assert np.array_equal(again.matrix, first.matrix)
            assert load_alignment(path).target_norm == first.target_norm  # and the file is whole again
        assert len(computed) == 3

    def test_the_key_is_the_file_content_kind_and_lambda(self, untied, cache_home):
        path, _, _ = untied
        load_alignment(path)
        load_alignment(path, "identity")
        load_alignment(path, lam=1e-3)
        names = sorted(p.name for p in (cache_home / "latent-align").iterdir())
        sha = file_sha256(path)
        assert names == sorted([f"{sha}-identity-v1.npz", f"{sha}-ridge-lam0.001-v1.npz", f"{sha}-ridge-lam1e-05-v1.npz"])

    def test_an_interrupted_write_leaves_no_cache_and_no_temporary_file(self, untied, cache_home, monkeypatch):
        path, _, _ = untied

        def interrupted(handle, **arrays):
            handle.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt

        monkeypatch.setattr(al, "_write_npz", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load_alignment(path)
        assert list((cache_home / "latent-align").iterdir()) == []

    def test_a_cache_of_another_shape_is_not_used(self, untied, cache_home, tmp_path):
        path, w_out, w_in = untied
        target = cache_file(file_sha256(path), "ridge", ALIGN_LAMBDA)
        al._write_cache(target, kind="ridge", lam=ALIGN_LAMBDA, matrix=np.eye(8, dtype=np.float32), norm=1.0)
        alignment = load_alignment(path)
        np.testing.assert_allclose(alignment.matrix, ridge_by_lstsq(w_out, w_in, ALIGN_LAMBDA), atol=1e-4)


class TestErrors:
    def test_a_model_without_input_or_output_table_is_refused_clearly(self, tmp_path, cache_home):
        path = write_tables(tmp_path / "none.gguf", {"blk.0.attn_q.weight": np.zeros((16, 16), np.float32)})
        with pytest.raises(UnsupportedModelError, match="no token_embd.weight.*cot"):
            load_alignment(path)

    def test_output_and_input_tables_of_different_vocabularies_are_refused(self, tmp_path, cache_home):
        path = write_tables(tmp_path / "mismatch.gguf", {"token_embd.weight": np.zeros((100, 16), np.float32),
                                                         "output.weight": np.zeros((90, 16), np.float32)})
        with pytest.raises(UnsupportedModelError, match="one row per token"):
            load_alignment(path)

    def test_identity_needs_equal_widths_and_the_hidden_width_must_match(self, tmp_path, cache_home):
        rng = np.random.default_rng(2)
        path = write_tables(tmp_path / "wide.gguf", {"token_embd.weight": rng.standard_normal((64, 16)),
                                                     "output.weight": rng.standard_normal((64, 8))})
        with pytest.raises(UnsupportedModelError, match="identity alignment needs"):
            load_alignment(path, "identity")
        with pytest.raises(UnsupportedModelError, match="hidden state has 12 values"):
            load_alignment(path, n_hidden=12)
        assert load_alignment(path).matrix.shape == (8, 16)  # ridge maps 8 hidden values to 16 inputs

    def test_bad_kind_or_lambda(self, untied):
        path, _, _ = untied
        with pytest.raises(InvalidParameterError, match="unknown latent alignment 'pca'"):
            load_alignment(path, "pca")
        with pytest.raises(InvalidParameterError, match="ridge lambda"):
            load_alignment(path, lam=0.0)
