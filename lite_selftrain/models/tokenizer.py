"""The llm-jp-3 tokenizer built locally, and the two tokenising rules every caller shares.

    tok = build_llm_jp_tokenizer()                 # Hugging Face fast tokenizer of the llm-jp v3.0 vocabulary
    ids = encode(tok, ["<s>\\n\\n### 指示:\\n..."])    # exactly one BOS, whatever the text starts with
    text = decode_continuation(tok, token_ids)     # a completion's text, its leading space kept

The SentencePiece model (`assets/llm_jp_3/`, Apache-2.0, 1.7 MB) ships inside the package, so the
`llm-jp-3-*` presets need no download and no checkout beside the package. It is read with
`sentencepiece`'s model description (protobuf) and rebuilt as a `tokenizers` Unigram model with the same
pieces and scores, byte fallback, no normalisation and the dummy prefix `▁` at the start of a text.
The pieces `<MASK> <PAD> <CLS> <SEP> <EOD>` (ids 3-7) take the spellings the published Hugging Face
settings use (`<PAD|LLM-jp>`, ...): a pad token spelled otherwise would be added as a new, untrained id.

Traps these rules close (the tests show each with this tokenizer):
- the llm-jp-3 chat template starts with `{{bos_token}}`; tokenised with special tokens it gave two BOS;
- SentencePiece's dummy prefix makes `tok(prompt) + tok(response)` differ from `tok(prompt + response)`,
  and decoding a completion alone drops the space its first piece `▁...` stands for.
Simplification: only the v3.0 vocabulary (what llm-jp-3 150m-172b use).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

ASSETS = Path(__file__).parents[1] / "assets" / "llm_jp_3"
LLM_JP_MODEL = ASSETS / "llm-jp-tokenizer-100k.ver3.0b1.model"
# SentencePiece piece -> the spelling of the published Hugging Face settings (tokenizer_config.ver3.0b2.json)
LLM_JP_RENAMED = {"<MASK>": "<MASK|LLM-jp>", "<PAD>": "<PAD|LLM-jp>", "<CLS>": "<CLS|LLM-jp>",
                  "<SEP>": "<SEP|LLM-jp>", "<EOD>": "<EOD|LLM-jp>"}
LLM_JP_CONTEXT = 4096  # the llm-jp-3 models' max_position_embeddings


@lru_cache(maxsize=1)
def _llm_jp_pieces(path: str) -> tuple[tuple[str, float, int], ...]:
    """(piece, score, type) of every piece of a SentencePiece model file; read once per process."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    if proto.trainer_spec.model_type != 1 or not proto.trainer_spec.byte_fallback:  # 1 = UNIGRAM
        raise ValueError(f"{path}: expected a Unigram model with byte fallback")
    return tuple((p.piece, p.score, p.type) for p in proto.pieces)


def build_llm_jp_tokenizer(save_dir: str | Path | None = None, model_file: str | Path = LLM_JP_MODEL):
    """The llm-jp-3 tokenizer as a PreTrainedTokenizerFast: BOS added (`add_bos_token: true`), no EOS,
    pad `<PAD|LLM-jp>` (id 4), the instruct models' chat template. Saved to `save_dir` when given."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = _llm_jp_pieces(str(model_file))
    vocab = [(LLM_JP_RENAMED.get(piece, piece), score) for piece, score, _ in pieces]
    core = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    # SentencePiece's dummy prefix, always (Metaspace skips it before a leading space: "  a" would differ);
    # text after a special token is a text of its own, as when SentencePiece encodes it alone
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])  # the dummy prefix goes again
    specials = [LLM_JP_RENAMED.get(piece, piece) for piece, _, kind in pieces if kind in (2, 3)]  # UNKNOWN, CONTROL
    core.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<PAD|LLM-jp>",
        cls_token="<CLS|LLM-jp>", sep_token="<SEP|LLM-jp>", mask_token="<MASK|LLM-jp>",
        model_max_length=LLM_JP_CONTEXT, clean_up_tokenization_spaces=False,
        chat_template=(ASSETS / "chat_template.jinja").read_text())
    if len(tok) != len(pieces):
        raise ValueError(f"the llm-jp tokenizer has {len(tok)} ids, its model {len(pieces)} pieces")
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


# ----------------------------------------------------------------------------------------------------
# the rules every caller shares


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text with the tokenizer's special tokens and exactly one leading BOS: a text that
    already starts with the BOS string (a chat template's `{{bos_token}}`) does not get a second one."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids
    return [seq[1:] if len(seq) > 1 and seq[0] == seq[1] == bos else seq for seq in ids]


def _anchor(tokenizer) -> list[int]:
    return tokenizer.encode("a", add_special_tokens=False)[:1]  # a plain letter: decodes the same anywhere


def decode_continuation(tokenizer, token_ids: list[int]) -> str:
    """The text `token_ids` add after some text, special tokens skipped. Decoding them alone would drop the
    space a leading `▁` piece stands for (the decoder strips the dummy prefix): decode after an anchor."""
    anchor = _anchor(tokenizer)
    head = tokenizer.decode(anchor)
    return tokenizer.decode(anchor + list(token_ids), skip_special_tokens=True)[len(head):]
