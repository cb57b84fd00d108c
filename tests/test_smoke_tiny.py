from autoprune import CalibrationConfig, EvaluationConfig, PlanRequest, prune


def test_prune_tiny_llama_end_to_end(tiny_llama_dir, data_dir, tmp_path):
    calibration = CalibrationConfig(source=str(data_dir), n_samples=8, seq_len=32)
    evaluation = EvaluationConfig(source=str(data_dir), seq_len=32, max_windows=4)
    report = prune(
        str(tiny_llama_dir), calibration, PlanRequest("sparsegpt", 0.5), tmp_path / "out",
        evaluation, progress=False,
    )
    assert abs(report.size.sparsity - 0.5) < 1e-6
    assert report.ppl is not None and report.ppl > 1
