"""experiments/bench/stop_rules.py at toy size: every spectrum and start runs both rules, the errors are measured
against the dense top eigenvalue, and on well-separated spectra both rules meet their tolerance."""
import pytest
import torch

from experiments.bench.stop_rules import SPECTRA, BenchConfig, eigenvalues, main


def test_rows_cover_every_spectrum_and_start_and_separated_spectra_meet_tol(capsys):
    cfg = BenchConfig(n=80, seeds=2, warm_noise=(0.3,))
    results = main(cfg)
    assert set(results) == {(kind, start) for kind in SPECTRA for start in ("cold", "warm 0.3")}
    for (kind, start), rows in results.items():
        assert rows["eigenvalue"]["hvps"] > 0 and rows["residual"]["hvps"] > 0
        if kind in ("outliers", "power 1", "pair 0.7"):   # gaps ≥ 30 % of the top: both rules meet tol
            assert rows["eigenvalue"]["worst"] <= cfg.tol and rows["residual"]["worst"] <= cfg.tol, (kind, start)
    assert "misses in" in capsys.readouterr().out


def test_spectra_are_what_they_say():
    gen = torch.Generator().manual_seed(0)
    pair = eigenvalues("pair 0.9", 50, gen)
    assert torch.topk(pair, 2).values.tolist() == [1.0, 0.9] and float(pair[2:].abs().max()) <= 0.1
    assert float(eigenvalues("outliers", 50, gen).max()) == 10.0
    shifted = eigenvalues("semicircle + 0.5", 400, gen)
    assert 2.2 < float(shifted.max()) < 2.6   # GOE edge at 2 (n → ∞), shifted by 0.5
    with pytest.raises(ValueError, match="unknown spectrum"):
        eigenvalues("flat", 10, gen)
