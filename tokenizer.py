"""
Tokenizers for every data and eval script: byte-level BPE through tiktoken, SentencePiece, or raw bytes.
load_tokenizer(spec) takes a spec string, the one stored in data/<name>/meta.json:
    "byte"               bytes 0..255 are ids 0..255, BOS = 256, EOS = 257, n_vocab = 258; no files
    "tiktoken:<name>"    a named tiktoken encoding (gpt2, cl100k_base, ...); downloaded by tiktoken on first use
    <dir>                an HF checkpoint dir: a SentencePiece tokenizer.model (Llama 2, Mistral-7B v0.1, TinyLlama;
                         through the sentencepiece package, whatever tokenizer.json sits beside it), else a byte-level
                         BPE tokenizer.json (GPT-2, SmolLM2, Llama-3 style), else a Llama-3 tiktoken tokenizer.model
    <owner>/<name>       a hub id (meta-llama/Llama-2-7b-hf): the dir checkpoint_dir() downloads into the HF cache
    python -c "from tokenizer import load_tokenizer; t = load_tokenizer('byte'); print(t.encode('hi'))"
"""
import base64
import functools
import json
import os
import re
import unicodedata

import tiktoken

# GPT-2's pre-tokenizer (HF ByteLevel with use_regex=True) and Llama-3's (meta-llama/llama3 tokenizer.py)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-2's pattern after HF Digits(individual_digits) has cut every digit out: digits are never joined to a
# space or each other, and a whitespace run before a digit ends its segment (so it counts as the text's end)
DIGITS_GPT2_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                   + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])  # 256 in all


class Tokenizer:
    """encode(text) -> ids (no specials added, special-token text is encoded as plain text); decode(ids) -> str."""
    def __init__(self, spec, enc, bos_id, eos_id, n_vocab, rank_to_id=None, normalizer=None):
        self.spec, self.enc, self.bos_id, self.eos_id, self.n_vocab = spec, enc, bos_id, eos_id, n_vocab
        # only when an HF vocab's ids are not in merge order: tiktoken works in ranks, the model in HF ids
        self.rank_to_id = rank_to_id
        self.id_to_rank = None if rank_to_id is None else {i: r for r, i in enumerate(rank_to_id)}
        self.normalizer = normalizer  # "NFC"/"NFKC"... applied before encoding, as the HF normalizer does

    def encode(self, text: str) -> list[int]:
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        if self.enc is None:  # "byte"
            return list(text.encode("utf-8"))
        ranks = self.enc.encode_ordinary(text)
        return ranks if self.rank_to_id is None else [self.rank_to_id[r] for r in ranks]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.enc is None:  # "byte": BOS/EOS decode to nothing
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        if self.id_to_rank is not None:
            ids = [self.id_to_rank[i] for i in ids]
        # a cut in the middle of a multi-byte character decodes to U+FFFD instead of raising
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """sentencepiece's own encode: the dummy-prefix '▁' first, byte fallback, control pieces (<s>, </s>) never
    matched in text. decode drops control ids and, like sentencepiece, the leading '▁' of the first piece, so
    decode(encode(text)) == text; text decoded after a prompt is decode(prompt + ids) less decode(prompt)."""
    def __init__(self, spec, sp, bos_id, eos_id):
        super().__init__(spec, None, bos_id, eos_id, sp.get_piece_size())
        self.sp = sp

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:  # ids past the vocab (a model's padded embedding rows) decode to nothing
        return self.sp.decode([i for i in map(int, ids) if 0 <= i < self.n_vocab])


def load_tokenizer(spec: str) -> Tokenizer:
    """Build (once per spec, then cached) the tokenizer a spec string names; see the module docstring."""
    return _load(os.path.abspath(spec) if os.path.isdir(spec) else spec)


# what a training run reads of a hub checkpoint: config, safetensors weights (model*.safetensors: not the
# consolidated.safetensors copy Mistral repos add, nor *.bin), tokenizer files
HUB_FILES = ["config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
             "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


@functools.lru_cache(maxsize=None)
def checkpoint_dir(spec: str) -> str:
    """The local dir of a checkpoint spec: spec itself, or for a hub id (owner/name, not a local path) its
    snapshot in the HF cache, downloaded once by huggingface_hub (HF_HUB_OFFLINE=1 reads the cache alone)."""
    if os.path.exists(spec) or not HUB_ID.fullmatch(spec):
        return spec
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{spec!r} is no local dir; to fetch it from the hub: pip install huggingface_hub") from None
    try:
        return snapshot_download(spec, allow_patterns=HUB_FILES)
    except (OSError, ValueError) as e:  # offline, no such repo, gated, a malformed id: all are OSError/ValueError there
        kinds = {c.__name__ for c in type(e).__mro__}
        known = {"GatedRepoError": "gated: accept its license on the hub, then `hf auth login` or set HF_TOKEN",
                 "RepositoryNotFoundError": "no such repo, or a private one",
                 "LocalEntryNotFoundError": "the hub is unreachable or HF_HUB_OFFLINE=1, and the HF cache lacks it"}
        first = (str(e).strip().splitlines() or [""])[0][:120]  # hub messages run over several lines
        why = next((known[k] for k in known if k in kinds), f"{type(e).__name__}: {first}")
        raise FileNotFoundError(f"{spec!r} is no local dir and could not be fetched from the Hugging Face hub ({why}); "
                                f"offline, pass a local checkpoint dir (python data/smollm2/prepare.py writes one) or "
                                f"set HF_HUB_OFFLINE=1 with an HF cache (HF_HOME) that holds it") from None


@functools.lru_cache(maxsize=None)
def _load(spec: str) -> Tokenizer:
    if spec == "byte":
        return Tokenizer(spec, None, bos_id=256, eos_id=257, n_vocab=258)
    if spec.startswith("tiktoken:"):
        name = spec.removeprefix("tiktoken:")
        if name not in tiktoken.list_encoding_names():
            raise ValueError(f"unknown tiktoken encoding {name!r}; known: {tiktoken.list_encoding_names()}")
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # tiktoken fetches the BPE file over HTTP on first use, then caches it
            raise ConnectionError(f"tiktoken encoding {name!r} is downloaded on first use and could not be fetched: "
                                  f"this machine appears offline (set TIKTOKEN_CACHE_DIR to a cache that has it). "
                                  f"Cause: {type(e).__name__}: {e}") from e
        # the OpenAI encodings have an end-of-text token and no BOS (nanoGPT's usage)
        return Tokenizer(spec, enc, None, enc._special_tokens.get("<|endoftext|>"), enc.n_vocab)
    path = checkpoint_dir(spec)  # a hub id reads its local snapshot and stays the spec (data and runs record it)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer spec {spec!r} is not 'byte', 'tiktoken:<name>', a directory or a hub id")
    model_file = os.path.join(path, "tokenizer.model")
    if _is_sentencepiece(model_file):
        tok = _from_sentencepiece(path)
    elif os.path.exists(os.path.join(path, "tokenizer.json")):
        tok = _from_tokenizer_json(path)
    elif os.path.exists(model_file):
        tok = _from_tiktoken_model(path)
    else:
        raise FileNotFoundError(f"{path} has neither tokenizer.json nor tokenizer.model")
    tok.spec = spec
    return tok


def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character HF uses for each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _pattern(pre: dict | None) -> str:
    """One regex for tiktoken that splits text as the HF byte-level pre-tokenizer does. Three shapes are known:
    ByteLevel (GPT-2), Sequence[Digits(individual_digits), ByteLevel] (SmolLM2), Sequence[Split, ByteLevel] (Llama-3)."""
    steps = [] if pre is None else pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    types = [s["type"] for s in steps]
    if not types or types[-1] != "ByteLevel":
        raise ValueError(f"pre-tokenizer {types} is not byte-level BPE (ends without ByteLevel): not tiktoken-compatible")
    *first, last = steps
    if last.get("add_prefix_space"):
        raise ValueError("pre-tokenizer ByteLevel(add_prefix_space=True) is not supported")
    regex = last.get("use_regex", True)
    if types == ["ByteLevel"] and regex:
        return GPT2_PATTERN
    if types == ["Digits", "ByteLevel"] and regex and first[0]["individual_digits"]:
        return DIGITS_GPT2_PATTERN
    if types == ["Split", "ByteLevel"] and not regex and "Regex" in first[0]["pattern"] \
            and first[0]["behavior"] == "Isolated" and not first[0]["invert"]:
        return first[0]["pattern"]["Regex"]
    raise ValueError(f"pre-tokenizer {steps} is not supported: known are ByteLevel(use_regex), "
                     f"[Digits(individual_digits), ByteLevel(use_regex)], [Split(Isolated regex), ByteLevel]")


def _special_ids(path: str, vocab: dict[str, int]) -> tuple[int | None, int | None]:
    """bos/eos ids: tokenizer_config.json token strings first, then generation_config.json, then config.json."""
    out = {}
    for name in ("tokenizer_config.json", "generation_config.json", "config.json"):
        file = os.path.join(path, name)
        cfg = json.load(open(file)) if os.path.exists(file) else {}
        for which in ("bos", "eos"):
            tok, tid = cfg.get(f"{which}_token"), cfg.get(f"{which}_token_id")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if tok in vocab:
                out.setdefault(which, vocab[tok])
            if tid is not None:  # a list of eos ids keeps the first (as model.ModelConfig)
                out.setdefault(which, tid[0] if isinstance(tid, list) else tid)
    return out.get("bos"), out.get("eos")


def _from_tokenizer_json(path: str) -> Tokenizer:
    tj = json.load(open(os.path.join(path, "tokenizer.json"), encoding="utf-8"))
    model, pre = tj["model"], tj.get("pre_tokenizer")
    if model["type"] != "BPE" or (pre or {}).get("type") == "Metaspace" or model.get("byte_fallback"):
        raise ValueError(f"{path}/tokenizer.json is a SentencePiece-style tokenizer (model {model['type']}, "
                         f"pre-tokenizer {(pre or {}).get('type')}): it loads from the SentencePiece tokenizer.model "
                         f"that such checkpoints ship beside it, and {path} has none")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{path}/tokenizer.json: BPE with subword prefix/suffix is not byte-level BPE")
    norm = tj.get("normalizer")
    if norm is not None and norm["type"] not in ("NFC", "NFD", "NFKC", "NFKD"):
        raise ValueError(f"{path}/tokenizer.json: normalizer {norm['type']} is not supported")
    pattern = _pattern(pre)
    # byte-level tokens are strings of GPT-2's printable stand-ins for bytes: map them back to bytes
    b = _byte_decoder()
    specials = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    ranks = {bytes(b[c] for c in tok): i for tok, i in model["vocab"].items() if tok not in specials}
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    made = [ranks.get(bytes(b[c] for c in "".join(m)), -1) for m in merges]  # id each merge creates
    if -1 in made:
        raise ValueError(f"{path}/tokenizer.json: merge {merges[made.index(-1)]} makes a token not in the vocab")
    n_vocab = max([*model["vocab"].values(), *specials.values()]) + 1
    rank_to_id = None
    if any(x >= y for x, y in zip(made, made[1:])):
        # tiktoken merges the pair whose result has the lowest rank, HF the pair listed first: when ids are
        # not in merge order, rank tokens by merge order (bytes first) and map ranks <-> HF ids
        by_id = {i: t for t, i in ranks.items()}
        order = sorted(t for t in ranks if len(t) == 1)
        order += list(dict.fromkeys(by_id[i] for i in made))
        order += sorted((t for t in ranks if t not in set(order)), key=ranks.get)
        rank_to_id = [ranks[t] for t in order] + sorted(specials.values())
        new = {t: r for r, t in enumerate(order)}
        specials = {s: len(order) + k for k, s in enumerate(sorted(specials, key=specials.get))}
        ranks = new
    enc = tiktoken.Encoding(f"hf:{path}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    bos, eos = _special_ids(path, {**model["vocab"], **{t["content"]: t["id"] for t in tj.get("added_tokens", [])}})
    return Tokenizer(path, enc, bos, eos, n_vocab, rank_to_id, norm and norm["type"])


def _from_tiktoken_model(path: str) -> Tokenizer:
    file = os.path.join(path, "tokenizer.model")
    ranks = {}
    with open(file, "rb") as f:
        for line in f.read().splitlines():
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{file} is neither a SentencePiece model nor a tiktoken BPE file (base64 token, "
                                 f"rank per line)")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
    specials = {s: len(ranks) + k for k, s in enumerate(LLAMA3_SPECIALS)}
    enc = tiktoken.Encoding(f"llama3:{path}", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    bos, eos = _special_ids(path, specials)
    bos = specials["<|begin_of_text|>"] if bos is None else bos
    eos = specials["<|end_of_text|>"] if eos is None else eos
    return Tokenizer(path, enc, bos, eos, enc.n_vocab)


def _is_sentencepiece(file: str) -> bool:
    """A SentencePiece model is a protobuf whose first field is its pieces (tag byte 0x0A); tiktoken's file is text."""
    if not os.path.exists(file):
        return False
    with open(file, "rb") as f:
        return f.read(1) == b"\n"


def _from_sentencepiece(path: str) -> Tokenizer:
    file = os.path.join(path, "tokenizer.model")
    try:
        import sentencepiece
    except ImportError:
        raise ImportError(f"{file} is a SentencePiece model: pip install sentencepiece") from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(file)
    except RuntimeError as e:
        raise ValueError(f"{file} does not load as a SentencePiece model ({str(e).strip()[:120]})") from None
    # BOS/EOS by id: the checkpoint's config files first (as for tokenizer.json), then the model's own
    bos, eos = _special_ids(path, {sp.id_to_piece(i): i for i in range(sp.get_piece_size())})
    bos = sp.bos_id() if bos is None and sp.bos_id() >= 0 else bos
    eos = sp.eos_id() if eos is None and sp.eos_id() >= 0 else eos
    return SentencePieceTokenizer(path, sp, bos, eos)


def chat_renderer(tok_dir: str):
    """(render(user text) -> prompt text, special-token text -> id) from a checkpoint dir's (or hub id's) chat
    template, rendered as transformers' apply_chat_template does: sandboxed jinja2, trim/lstrip blocks, one user
    message, add_generation_prompt=True. sample.py --chat and data/alpaca/prepare.py --chat_template use it."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # only chat templates need jinja2 (torch brings it)
    tok_dir = checkpoint_dir(tok_dir)
    path = os.path.join(tok_dir, "tokenizer_config.json")
    cfg = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}
    template = cfg.get("chat_template")
    if os.path.isfile(os.path.join(tok_dir, "chat_template.jinja")):  # newer transformers save it beside the config
        template = open(os.path.join(tok_dir, "chat_template.jinja"), encoding="utf-8").read()
    if isinstance(template, list):  # a list of named templates: the default one
        template = {t["name"]: t["template"] for t in template}.get("default")
    if not template:
        raise ValueError(f"{tok_dir} has no chat template (tokenizer_config.json chat_template)")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(f"chat template: {msg}"))
    compiled = env.from_string(template)
    tokens = {k: (v["content"] if isinstance(v, dict) else v) for k, v in cfg.items()
              if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    specials = {v["content"]: int(i) for i, v in cfg.get("added_tokens_decoder", {}).items()}
    render = lambda text: compiled.render(messages=[{"role": "user", "content": text}],  # noqa: E731
                                          add_generation_prompt=True, **tokens)
    return render, specials


def encode_with_specials(tok: Tokenizer, text: str, specials: dict) -> list[int]:
    """encode() spells special-token text out as plain text: split the specials out first, as HF tokenizers do."""
    if not specials:
        return tok.encode(text)
    parts = re.split("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")", text)
    return [i for p in parts if p for i in ([specials[p]] if p in specials else tok.encode(p))]
