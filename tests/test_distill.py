"""`streamoe distill-mtp` (shared/model/distill.py): trains the MTP layer only, deterministically, and
writes it back without touching any other tensor's bytes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from distilled import QUICK
from safetensors import safe_open
from safetensors.torch import save_file

from shared.launcher.cli import main
from shared.model import distill
from shared.model.distill import DistillSettings, NoMTPLayerError, distill_mtp
from shared.model.loader import load_model
from shared.model.presets import init_model

pytestmark = pytest.mark.unit

MTP = "model.layers.3."  # tiny: 3 main layers, then the MTP layer
FROZEN = (MTP + "embed_tokens.weight", MTP + "shared_head.head.weight", MTP + "mlp.gate.e_score_correction_bias")


def _tensors(directory: Path) -> dict[str, bytes]:
    """Every tensor of a checkpoint (single or sharded) -> its dtype, shape and bytes."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


@pytest.fixture(scope="module")
def trained(distilled_mtp) -> tuple[Path, dict]:
    return distilled_mtp


def test_only_the_mtp_layer_changes(tiny_mtp, trained):
    out, result = trained
    before, after = _tensors(tiny_mtp), _tensors(out)
    assert set(before) == set(after)
    changed = {name for name in before if before[name] != after[name]}
    assert changed and all(name.startswith(MTP) for name in changed)
    assert not changed & set(FROZEN)
    # every trained tensor moved: the norms, eh_proj, attention, gate, shared and routed experts
    for name in (MTP + "enorm.weight", MTP + "hnorm.weight", MTP + "eh_proj.weight", MTP + "shared_head.norm.weight",
                 MTP + "self_attn.kv_b_proj.weight", MTP + "mlp.gate.weight", MTP + "mlp.shared_experts.up_proj.weight",
                 MTP + "mlp.experts.0.gate_proj.weight", MTP + "mlp.experts.15.down_proj.weight"):
        assert name in changed, name
    assert all(after[name][0] == before[name][0] for name in before)  # the checkpoint's dtypes
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (tiny_mtp / name).read_bytes()


def test_trained_layer_loads_and_beats_the_untrained_one(tiny_mtp, trained):
    out, result = trained
    assert result["acceptance"] > max(5 * result["untrained"], result["untrained"] + 0.01)
    assert result["acceptance"] > result["repeat_last"]
    # measured again on the written checkpoint, on sequences of another seed
    gen = torch.Generator().manual_seed(99)
    source = load_model(tiny_mtp, dtype="fp32", moe_backend="loop")
    prompts = [distill._random_prompt(gen, source.args.vocab_size, QUICK.prompt_len) for _ in range(48)]
    seqs = distill._continue_greedy(source, prompts, QUICK.gen_tokens, 48)
    hidden = distill._hidden_states(source, [s for s, _ in seqs])
    examples = [distill._Example.of(tokens, n, h) for (tokens, n), h in zip(seqs, hidden)]
    untrained = distill.evaluate(source, examples)["acceptance"]
    written = distill.evaluate(load_model(out, dtype="fp32", moe_backend="loop"), examples)["acceptance"]
    assert written > max(5 * untrained, untrained + 0.01), (written, untrained)


def test_deterministic_for_a_seed(tiny_mtp, tmp_path):
    """Bit for bit on one thread. (With two, the suite has seen one run in four differ from the
    next: the sums of the BLAS are split by thread, and a near-tie in the generated data then
    changes what is trained on. The cause is not pinned down yet: shared/model/README.md.)"""
    settings = DistillSettings(steps=40, train_seqs=64, heldout_seqs=8, gen_tokens=32, batch_seqs=8, warmup_steps=5,
                               lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ("a", "b"):
            distill_mtp(tiny_mtp, tmp_path / name, seed=3, settings=settings, progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert _tensors(tmp_path / "a") != _tensors(tiny_mtp)  # it trained


def test_gradients_reach_every_trained_tensor(tiny_mtp):
    model = load_model(tiny_mtp, dtype="fp32", moe_backend="loop")
    gen = torch.Generator().manual_seed(0)
    seqs = distill._continue_greedy(model, [distill._random_prompt(gen, 1024, (8, 12)) for _ in range(4)], 24, 4)
    hidden = distill._hidden_states(model, [s for s, _ in seqs])
    examples = [distill._Example.of(tokens, n, h) for (tokens, n), h in zip(seqs, hidden)]
    next_ids, h, cos, sin, attn, rows, targets, teacher = distill._pack(model, examples)
    with torch.inference_mode():  # as the engine drafts: the MoE's load counter becomes an inference tensor
        model.mtp(next_ids, h, cos, sin, attn, None)
    params = distill._make_trainable(model.mtp)
    stack = model.mtp.mlp.stack
    assert any(p is stack.w13 for p in params) and any(p is stack.w2 for p in params)
    out = model.mtp(next_ids, h, cos, sin, attn, None).index_select(0, rows)
    distill._chunked_loss_backward(out, targets, teacher, model.mtp.shared_head.head, model.lm_head,
                                   DistillSettings(chunk_rows=7))
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.mtp.embed_tokens.weight.grad is None and model.mtp.shared_head.head.weight.grad is None
    used = model.mtp.mlp.expert_load.nonzero().squeeze(1)
    assert (stack.w13.grad[used].flatten(1).abs().sum(1) > 0).all()


def test_chunked_loss_matches_the_whole():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    out = torch.randn(23, 16, requires_grad=True)
    targets, teacher = torch.randint(0, 50, (23,)), torch.randn(23, 16)
    settings = DistillSettings(chunk_rows=5, distill_weight=0.5, hidden_weight=2.0)
    loss = distill._chunked_loss_backward(out * 1.0, targets, teacher, head, head, settings)
    chunked = out.grad.clone()
    out.grad = None
    logits = head(out)
    whole = (torch.nn.functional.cross_entropy(logits, targets)
             + 0.5 * torch.nn.functional.cross_entropy(logits, head(teacher).softmax(-1).detach())
             + 2.0 * (out - teacher).pow(2).mean(-1).mean())
    whole.backward()
    assert loss == pytest.approx(float(whole.detach()), rel=1e-5)
    torch.testing.assert_close(chunked, out.grad)


def test_in_place_single_file_and_sharded(tiny_mtp, tmp_path):
    settings = DistillSettings(steps=3, train_seqs=8, heldout_seqs=4, gen_tokens=8, batch_seqs=4, warmup_steps=1)
    single = tmp_path / "single"
    shutil.copytree(tiny_mtp, single)
    names = sorted(p.name for p in single.iterdir())
    before = _tensors(single)
    distill_mtp(single, steps=3, settings=settings, progress=False, log=lambda _: None)
    assert sorted(p.name for p in single.iterdir()) == names  # no temporary file left
    after = _tensors(single)
    assert {n for n in before if before[n] != after[n]} and all(
        n.startswith(MTP) for n in before if before[n] != after[n])
    load_model(single, dtype="fp32")

    # a sharded copy: the MTP layer's tensors split over both shards, mixed with the main model's
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_mtp, sharded)
    (sharded / "model.safetensors").unlink()
    with safe_open(str(tiny_mtp / "model.safetensors"), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    shards: dict[str, dict] = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    files = list(shards)
    for i, name in enumerate(sorted(tensors)):
        shards[files[i % 2]][name] = tensors[name]
    for file, part in shards.items():
        save_file(part, str(sharded / file), metadata={"format": "pt"})
    weight_map = {name: file for file, part in shards.items() for name in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    distill_mtp(sharded, settings=settings, progress=False, log=lambda _: None)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files_now = {p.name for p in sharded.glob("*.safetensors")}
    assert files_now == set(index["weight_map"].values())  # the old shards are gone, nothing else left
    assert not [p for p in sharded.iterdir() if p.name.startswith(".")]
    assert len({index["weight_map"][n] for n in index["weight_map"] if n.startswith(MTP)}) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    sharded_after = _tensors(sharded)
    assert set(sharded_after) == set(before)
    assert all(sharded_after[n] == before[n] for n in before if not n.startswith(MTP))
    model = load_model(sharded, dtype="fp32")
    assert model.mtp is not None
    # a second run replaces the MTP shard and leaves the rest
    distill_mtp(sharded, seed=1, settings=settings, progress=False, log=lambda _: None)
    index2 = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert {p.name for p in sharded.glob("*.safetensors")} == set(index2["weight_map"].values())
    load_model(sharded, dtype="fp32")


def test_fp8_checkpoint_is_requantized(tmp_path):
    source = init_model(tmp_path / "fp8", "tiny", seed=0, dtype="bf16", fp8=True, mtp=True)
    out = tmp_path / "out"
    settings = DistillSettings(steps=3, train_seqs=8, heldout_seqs=4, gen_tokens=8, batch_seqs=4, warmup_steps=1)
    distill_mtp(source, out, settings=settings, progress=False, log=lambda _: None)
    before, after = _tensors(source), _tensors(out)
    assert set(before) == set(after) and all(after[n][:2] == before[n][:2] for n in before)
    assert after[MTP + "self_attn.o_proj.weight"][0] == "torch.float8_e4m3fn"
    assert before[MTP + "self_attn.o_proj.weight_scale_inv"] != after[MTP + "self_attn.o_proj.weight_scale_inv"]
    assert all(before[n] == after[n] for n in before if not n.startswith(MTP))
    load_model(out, dtype="bf16")


def test_refuses_a_model_without_mtp_layer(tmp_path, capsys):
    plain = init_model(tmp_path / "plain", "tiny", seed=0, dtype="fp32")
    with pytest.raises(NoMTPLayerError, match="streamoe init-model --mtp"):
        distill_mtp(plain, progress=False, log=lambda _: None)
    assert main(["distill-mtp", "--model", str(plain), "--steps", "5"]) == 2
    assert "streamoe init-model --mtp" in capsys.readouterr().err


# ---- the distilled layer in the engine: the accept path, and acceptance at temperature > 0 ----

def _held_out_requests(model, count: int, max_tokens: int, **sampling) -> dict:
    from shared.engine.sequence import SamplingParams

    gen = torch.Generator().manual_seed(5)
    prompts = [distill._random_prompt(gen, model.args.vocab_size, QUICK.prompt_len) for _ in range(count)]
    return {f"h{i}": (p, SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=i, **sampling))
            for i, p in enumerate(prompts)}


def test_a_distilled_layer_is_accepted_and_keeps_the_tokens(trained):
    from reference import load_reference, reference_greedy
    from test_engine import run

    from shared.engine.engine import Engine, EngineConfig

    out, _ = trained
    model = load_model(out, dtype="fp32")
    requests = _held_out_requests(model, 16, 24)
    ref = load_reference(out)  # the main model's tokens (transformers skips the MTP layer)
    expected = {rid: reference_greedy(ref, prompt, 24) for rid, (prompt, _) in requests.items()}
    for n in (1, 2):
        engine = Engine(model, EngineConfig(max_num_batched_tokens=512, speculative_tokens=n))
        outputs = run(engine, requests)
        for rid, exp in expected.items():
            assert outputs[rid][:exp.trusted] == exp.tokens[:exp.trusted], rid
        assert sum(e.trusted for e in expected.values()) >= 0.6 * 16 * 24
        spec = engine.spec
        # the accept path ran: drafts kept, counted per position
        assert spec.num_accepted_tokens > 0 and spec.accepted_per_pos[0] > 0, vars(spec)
        assert spec.num_accepted_tokens == sum(spec.accepted_per_pos)
        assert engine.blocks.num_free == engine.blocks.num_blocks


def test_acceptance_matches_the_target_probability_of_the_drafts(trained):
    """A draft x at a sampled row is kept with probability p_target(x): over ~2000 first drafts the
    number kept is Σ p within a few standard deviations (fixed seeds: the outcome is deterministic)."""
    from test_engine import run

    from shared.engine.engine import Engine, EngineConfig
    from shared.engine.sampler import Sampler

    class Recording(Engine):
        probs: list[float] = []
        kept = 0

        def postprocess(self, scheduled, logits):
            row = 0
            for item in scheduled:
                if not item.sample:
                    continue
                if item.draft:
                    self.probs.append(float(Sampler.probs(logits[row], item.seq.params)[item.draft[0]]))
                row += 1 + len(item.draft)
            before = self.spec.accepted_per_pos[0]
            deltas = super().postprocess(scheduled, logits)
            self.kept += self.spec.accepted_per_pos[0] - before
            return deltas

    out, _ = trained
    model = load_model(out, dtype="fp32")
    engine = Recording(model, EngineConfig(max_num_batched_tokens=1024, speculative_tokens=1))
    engine.probs = []
    run(engine, _held_out_requests(model, 64, 32, temperature=0.6, top_k=8))
    expected = sum(engine.probs)
    sd = sum(p * (1 - p) for p in engine.probs) ** 0.5
    assert len(engine.probs) > 1500 and expected > 20, (len(engine.probs), expected)  # enough to tell
    assert abs(engine.kept - expected) < 4 * sd, (engine.kept, expected, sd)
