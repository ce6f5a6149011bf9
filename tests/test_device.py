"""Every tensor of a step lives on the engine's device.

Without a GPU this is checked on the CPU with torch's default device set to
``meta``: a tensor made without ``device=`` lands on meta, and the first op that
mixes it with the model's CPU tensors fails. The engine's outputs under that
trap (every policy in one batch: prompt chunks, decode, compression and its
probes, block_topk's needs, a tiered store, int4 KV, sampling with penalties and
DRY, a prefix attached from the radix cache) must equal a run without it.

With CUDA (``torch.cuda.is_available()``) the same requests run on the GPU, and
their logits must match the CPU's; skipped otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_llama_weights

from longkv.config import EngineConfig, ModelConfig, check_device
from longkv.engine.engine import Engine, Request, RequestOutput
from longkv.engine.runner import Runner
from longkv.engine.sampling import SamplingParams
from longkv.errors import LongKVError
from longkv.kv.radix import PrefixCache
from longkv.models import build
from longkv.models.layers import Linear
from longkv.policies import make_policy

CFG = ModelConfig(
    arch="llama", vocab_size=97, hidden_size=32, intermediate_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
    head_dim=8, max_position=2048, eos_token_ids=(0,),
)  # fmt: skip
BLOCK = "block_topk:sinks=8,window=32,query_tokens=8,topk=2,dense_below=0"
POLICIES = [
    "dense",
    "dense:kv_quant=int4",
    "streaming:budget=40,sinks=4",
    "snapkv:budget=40",
    "h2o:budget=40",
    "adakv:budget=40",
    "kvzip:budget=40",
    "knorm:budget=40",
    "random:budget=40",
    BLOCK + ",verify=3,verify_tokens=2",  # needs: probe, texts, re-encoding
    BLOCK + ",score=minmax,scope=head,reencode=false",
    BLOCK + ",resident=40KiB,cold=disk",  # a tiered store: sinks + hot tail on the device, cold pages on disk
]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to this torch build")


class _Tok:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + t % 26) for t in ids if t != 0 or not skip_special_tokens)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(1, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _params(i: int) -> SamplingParams:
    if i % 3 == 0:
        return SamplingParams(max_new_tokens=6, ignore_eos=True)
    return SamplingParams(
        max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.2, dry_multiplier=0.8, seed=i, ignore_eos=True
    )


def _run(device: str, tmp_path: Path, trap: bool) -> list[RequestOutput]:
    """Every policy's request in one engine on ``device`` (and one that starts from a cached prefix)."""
    engine_cfg = EngineConfig(chunk_size=16, page_size=8, dtype="float32", device=device)
    model = build(CFG, random_llama_weights(CFG, 0, 0.3), device=engine_cfg.device)
    engine = Engine(model, _Tok(), frozenset({0}), engine_cfg, max_num_seqs=len(POLICIES) + 1)
    specs = [s.replace("cold=disk", f"cold=disk,tier_dir={tmp_path}") for s in POLICIES]
    policies = [make_policy(s).resolve(CFG, engine_cfg) for s in specs]
    prompts = [_ids(90 + 7 * i, seed=i) for i in range(len(specs))]
    shared = _ids(40, seed=99)
    prefix = PrefixCache(1 << 20)
    outs: dict[str, RequestOutput] = {}
    previous = torch.get_default_device()
    if trap:
        torch.set_default_device("meta")
    try:
        # a dense turn that stores its prefix, then a request that attaches it (no copy)
        seed_rid = engine.add_request(
            Request(shared, SamplingParams(max_new_tokens=2, ignore_eos=True), policies[0],
                    on_release=lambda seq, out: prefix.insert("ns", seq.tokens, seq.cache))
        )  # fmt: skip
        while engine.has_unfinished():
            engine.step()
        runner = Runner(model, policies[0], engine_cfg, engine.pools)
        seq = runner.new_sequence()
        m = prefix.match("ns", [*shared, 5, 6, 7])
        assert m.length == len(shared)
        prefix.load(m, seq.cache, m.length)
        seq.tokens = list(shared)
        rids = [engine.add_request(Request([*shared, 5, 6, 7], _params(1), policies[0], sequence=seq))]
        rids += [
            engine.add_request(Request(p, _params(i), pol, question_ids=p[-8:] if i % 2 else None))
            for i, (p, pol) in enumerate(zip(prompts, policies, strict=True))
        ]
        while engine.has_unfinished():
            for ev in engine.step():
                if ev.finished:
                    outs[ev.request_id] = ev.output
    finally:
        torch.set_default_device(previous)
    assert seed_rid not in outs and engine.kv_bytes() == 0
    return [outs[r] for r in rids]


def test_no_step_makes_a_tensor_off_the_engine_device(tmp_path: Path) -> None:
    want = _run("cpu", tmp_path, trap=False)
    got = _run("cpu", tmp_path, trap=True)
    assert [o.finish_reason for o in got] == ["length"] * len(got), [repr(o.error) for o in got if o.error]
    for spec, a, b in zip(["dense (cached prefix)", *POLICIES], got, want, strict=True):
        assert a.token_ids == b.token_ids, spec


def test_device_names_are_checked() -> None:
    assert check_device("cpu") == "cpu" and EngineConfig(device="cpu").device == "cpu"
    for bad, msg in (("gpu", "unknown device 'gpu'"), ("mps", "not supported"), ("cuda:99", "cuda")):
        with pytest.raises(LongKVError, match=msg):
            EngineConfig(device=bad)
    if not torch.cuda.is_available():
        with pytest.raises(LongKVError, match="no CUDA GPU is visible.*--device cpu"):
            check_device("cuda")


def test_coded_decode_weights_stay_on_the_cpu() -> None:
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="int8 decode weights are a CPU format"):
        Linear(w.to("meta"), None, "int8")
    assert Linear(w.to("meta"), None, "none").q is None


@CUDA
def test_cuda_logits_equal_the_cpu(tmp_path: Path) -> None:
    """Each policy's greedy request on the GPU: prompt and decode logits as on the CPU (float32, 1e-3; 2e-2 for the
    coded KV, whose codes flip where CPU and GPU round a value on either side of a step: 7.6e-3 measured for int4 on
    an H200), and the same greedy tokens."""
    out = {}
    for device in ("cpu", "cuda"):
        engine_cfg = EngineConfig(chunk_size=16, page_size=8, dtype="float32", device=device)
        model = build(CFG, random_llama_weights(CFG, 0, 0.3), device=engine_cfg.device)
        logits = []
        for i, spec in enumerate(POLICIES):
            runner = Runner(model, make_policy(spec.replace("cold=disk", f"cold=disk,tier_dir={tmp_path}")).resolve(CFG, engine_cfg), engine_cfg)
            seq = runner.new_sequence()
            lg = [runner.prefill(seq, _ids(90 + 7 * i, seed=i))]
            for _ in range(4):
                lg.append(runner.decode(seq, int(lg[-1].argmax())))
            logits.append(torch.stack(lg).cpu())
        out[device] = logits
    for spec, a, b in zip(POLICIES, out["cuda"], out["cpu"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2 if "kv_quant" in spec else 1e-3, msg=spec)
        assert torch.equal(a.argmax(-1), b.argmax(-1)), spec


@CUDA
def test_cuda_engine_batch_runs_every_policy(tmp_path: Path) -> None:
    outs = _run("cuda", tmp_path, trap=False)
    assert [len(o.token_ids) for o in outs] == [6] * len(outs)


FAMILIES = ["tiny_llama", "tiny_qwen2", "tiny_qwen3", "tiny_mistral", "tiny_gemma3"]


@CUDA
@pytest.mark.parametrize("fixture", FAMILIES)
def test_cuda_families_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    """Each family on the GPU (float32): logits over 100 tokens as transformers' on the CPU (1e-3, same argmax), and
    greedy tokens of three prompts decoded in one batch as each alone."""
    from transformers import AutoModelForCausalLM

    from longkv import LLM

    folder: Path = request.getfixturevalue(fixture)
    llm = LLM(model=folder, dtype="float32", chunk_size=16, device="cuda")
    ids = torch.randint(3, 300, (100,), generator=torch.Generator().manual_seed(21)).tolist()
    runner = Runner(llm.model, make_policy("dense").resolve(llm.config, llm.engine_config), llm.engine_config)
    ours = runner.logits_all(runner.new_sequence(len(ids)), ids)
    assert ours.device.type == "cuda"
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours.cpu() - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1).cpu(), ref.argmax(-1))
    g = torch.Generator().manual_seed(22)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (70, 45, 30)]
    alone = [llm.generate(p, max_new_tokens=12, policy="dense", ignore_eos=True).token_ids for p in prompts]
    batch = llm.generate_batch(prompts, max_new_tokens=12, policy="dense", ignore_eos=True)
    assert [o.token_ids for o in batch] == alone


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_server_smoke(device: str, tiny_llama: Path) -> None:
    """The OpenAI server on ``device``: /v1/models gives the window; a greedy chat, the same chat streamed, and two
    chats sent at once each give the tokens the engine gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from longkv import LLM
    from longkv.server.app import create_app
    from longkv.server.worker import ServerConfig

    llm = LLM(model=tiny_llama, dtype="float32", chunk_size=16, device=device)

    def body(text: str) -> dict:
        return {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0,
                "longkv": {"ignore_eos": True}}  # fmt: skip

    def alone(text: str) -> str:
        prompt = llm.tokenizer.apply_chat_template(body(text)["messages"], add_generation_prompt=True, tokenize=False)
        out = llm.generate(llm.prompt_ids(prompt), max_new_tokens=8, policy="dense", ignore_eos=True)
        return str(llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)).removesuffix("\ufffd")  # a character cut off: left out

    texts = ["the cat sat on", "a dog ran to the", "the bird"]
    with TestClient(create_app(llm, ServerConfig(model_id="tiny", cache_bytes=1 << 20))) as client:
        models = client.get("/v1/models").json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [("tiny", 512)]
        one = client.post("/v1/chat/completions", json=body(texts[0])).json()
        assert one["usage"]["completion_tokens"] == 8
        with client.stream("POST", "/v1/chat/completions", json={**body(texts[0]), "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
        streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        with ThreadPoolExecutor(2) as pool:
            two = list(pool.map(lambda t: client.post("/v1/chat/completions", json=body(t)).json(), texts[1:]))
    assert one["choices"][0]["message"]["content"] == streamed == alone(texts[0])
    assert [r["choices"][0]["message"]["content"] for r in two] == [alone(t) for t in texts[1:]]
