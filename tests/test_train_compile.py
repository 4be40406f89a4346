"""The fast path (snapopt.train.accel) trains the same thing: compiled vs eager losses, the bf16 teacher copy
leaves the pipeline's teacher alone, prompt embeddings are encoded once per run, speed options do not
block a resume."""

from __future__ import annotations

import torch

from conftest import BK_SMALL

CPU = torch.device("cpu")


def _recover_losses(pipe, **train):
    from snapopt.passes.remove_blocks import RemoveBlocks
    from snapopt.train import RecoverLoss, TrainOptions, Trainer
    from snapopt.train.recover import RecoverObjective

    student = pipe.clone(["unet"])
    RemoveBlocks({"component": "unet", "blocks": BK_SMALL}).run(student, None)
    o = TrainOptions(steps=3, batch=2, progress=False, optim=dict(lr=1e-3), **train)
    obj = RecoverObjective(pipe, student.unet, o, RecoverLoss(), device=CPU)
    hist = Trainer(obj, o, None).run().history
    obj.close()
    return [r["loss"] for r in hist], [r["feature_kd"] for r in hist]


def test_compiled_student_and_teacher_match_eager_losses(tiny_pipe):
    """torch.compile (aot_eager: dynamo + AOT autograd graphs, no code generation, so seconds on CPU) of the
    student forward/backward and the hooked teacher forward gives the eager losses over 3 steps. The graphs
    run the same fp32 kernels; only the order of a few reductions may differ, ~1e-7 relative per step, and
    three lr-1e-3 Adam steps keep that far below the 1e-4 tolerance. A lost feature hook (feature_kd 0 or
    missing) or a stale compiled teacher would differ by orders of magnitude more."""
    torch._dynamo.reset()
    eager, eager_feat = _recover_losses(tiny_pipe)
    comp, comp_feat = _recover_losses(tiny_pipe, compile=dict(backend="aot_eager"))
    torch._dynamo.reset()
    assert min(eager_feat) > 0
    torch.testing.assert_close(torch.tensor(comp), torch.tensor(eager), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(comp_feat), torch.tensor(eager_feat), rtol=1e-4, atol=1e-6)


def test_bf16_teacher_is_a_copy_and_close(tiny_pipe):
    """teacher_precision bf16 trains against a bf16 copy; the pipeline's teacher stays fp32 (evaluations use
    it). bf16 keeps 8 bits of mantissa, so outputs agree to a few 1e-3 relative, not to fp32 rounding."""
    from snapopt.train import TrainOptions
    from snapopt.train.accel import TeacherForward

    fwd = TeacherForward(tiny_pipe.unet, TrainOptions(teacher_precision="bf16"), CPU)
    assert fwd.module is not tiny_pipe.unet and next(fwd.module.parameters()).dtype == torch.bfloat16
    assert next(tiny_pipe.unet.parameters()).dtype == torch.float32
    assert TeacherForward(tiny_pipe.unet, TrainOptions(teacher_precision="bf16"), CPU).module is fwd.module  # made once
    x, t, c = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = tiny_pipe.unet(x, t, c, return_dict=False)[0]
    out = fwd(x, t, c, return_dict=False)[0].float()
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 3e-2, rel
    assert TeacherForward(tiny_pipe.unet, TrainOptions(), CPU).module is tiny_pipe.unet  # fp32 on CPU: no copy


def test_prompt_embeddings_are_encoded_once(tiny_pipe):
    from snapopt.train.data import embed

    calls = []
    h = tiny_pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        # strings no other test embeds: the cache is process-wide, so a list another test used is already there
        prompts = ["embedding cache probe: a red circle", "embedding cache probe: a blue square", "embedding cache probe: a third"]
        a = embed(tiny_pipe, prompts, CPU)
        n = len(calls)
        b = embed(tiny_pipe, prompts, CPU)
        assert n >= 1 and len(calls) == n  # the second call encoded nothing
        assert torch.equal(a, b)
        embed(tiny_pipe, prompts[:2], CPU)
        assert len(calls) > n  # another prompt list is encoded
    finally:
        h.remove()


def test_speed_options_do_not_block_resume(tmp_path, tiny_pipe):
    """A run checkpointed eagerly resumes with compile / fused-optimizer / cudnn options changed."""
    from snapopt.passes.remove_blocks import RemoveBlocks
    from snapopt.train import RecoverLoss, TrainOptions, Trainer
    from snapopt.train.recover import RecoverObjective

    student = tiny_pipe.clone(["unet"])
    RemoveBlocks({"component": "unet", "blocks": BK_SMALL}).run(student, None)
    o = TrainOptions(steps=2, batch=2, progress=False, checkpoint_every=1, optim=dict(lr=1e-3))
    obj = RecoverObjective(tiny_pipe, student.unet, o, RecoverLoss(output_kd=0, feature_kd=0), device=CPU)
    Trainer(obj, o, tmp_path, device=CPU).run(until=1)
    fast = o.model_copy(update={"fused_optimizer": False, "cudnn_benchmark": True, "channels_last": True})
    res = Trainer(obj, fast, tmp_path, device=CPU).run(resume=True)
    assert res.resumed_from == 1 and res.steps == 1
    assert next(student.unet.parameters()).is_contiguous()  # channels-last is undone after training


def test_attention_backend_switches_sdpa_kernels_and_resets():
    """attention_backend: one SDPA kernel allowed (plus math, the fallback); auto leaves torch's flags alone."""
    from snapopt.train import TrainOptions
    from snapopt.train.accel import configure_backends, reset_attention_backends

    cuda = torch.backends.cuda
    try:
        configure_backends(TrainOptions(attention_backend="cudnn"), torch.device("cpu"))
        assert cuda.cudnn_sdp_enabled() and cuda.math_sdp_enabled()
        assert not cuda.flash_sdp_enabled() and not cuda.mem_efficient_sdp_enabled()
        configure_backends(TrainOptions(), torch.device("cpu"))  # auto: untouched
        assert not cuda.flash_sdp_enabled()
    finally:
        reset_attention_backends()
    assert cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled() and cuda.cudnn_sdp_enabled()


def test_deterministic_turns_off_autotuning_and_on_deterministic_kernels(monkeypatch):
    """deterministic: deterministic kernels (warning where an op has none), no cuDNN autotuning, cuBLAS's workspace
    fixed; contradicting cudnn_benchmark: true is refused. The switches are process-wide: restored after the test."""
    import pydantic
    import pytest

    from snapopt.train import TrainOptions
    from snapopt.train.accel import configure_backends

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # records the variable's state, restored after the test
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    try:
        torch.backends.cudnn.benchmark = True
        configure_backends(TrainOptions(deterministic=True), torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        configure_backends(TrainOptions(), torch.device("cuda"))  # a later stage: autotuning stays off
        assert not torch.backends.cudnn.benchmark
        from snapopt.errors import UsageError

        with pytest.raises(UsageError, match="cudnn_benchmark: true conflicts"):  # asked for explicitly: said, not ignored
            configure_backends(TrainOptions(cudnn_benchmark=True), torch.device("cuda"))
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]
    with pytest.raises(pydantic.ValidationError, match="cudnn_benchmark"):
        TrainOptions(deterministic=True, cudnn_benchmark=True)
