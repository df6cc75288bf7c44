"""Which languages a ranker's tokenizer can read: for one product-search phrase per language (the same
request, "sky-blue velvet pillow for the living-room sofa", in each), the tokens, how many are the
unknown token ([UNK]) and how finely the text is cut (characters per token).

    python -m rankserve.bench.vocabulary                       # the demo ranker's (all-MiniLM-L6-v2's) tokenizer
    python -m rankserve.bench.vocabulary --tokenizer model_repository/tokenize/1/tokenizer.json
    python -m rankserve.bench.vocabulary --cost                # what counting costs the tokenize stage

A token that is not [UNK] is not understood either: the encoder learnt from the data it was trained
on (all-MiniLM-L6-v2: English), and text cut into single characters carries little meaning to it."""

from __future__ import annotations

import argparse
from pathlib import Path

from rankserve.stages.coverage import unknown_token_id

SAMPLES = [
    ("English", "Latin", "sky-blue velvet pillow for the living room sofa"),
    ("German", "Latin", "himmelblaues Samtkissen für das Wohnzimmersofa"),
    ("French", "Latin", "coussin en velours bleu ciel pour le canapé du salon"),
    ("Spanish", "Latin", "cojín de terciopelo azul cielo para el sofá del salón"),
    ("Polish", "Latin", "błękitna aksamitna poduszka na sofę do salonu"),
    ("Turkish", "Latin", "oturma odası kanepesi için gök mavisi kadife yastık"),
    ("Vietnamese", "Latin", "gối nhung màu xanh da trời cho ghế sofa phòng khách"),
    ("Russian", "Cyrillic", "небесно-голубая бархатная подушка для дивана в гостиной"),
    ("Ukrainian", "Cyrillic", "небесно-блакитна оксамитова подушка для дивана у вітальні"),
    ("Greek", "Greek", "γαλάζιο βελούδινο μαξιλάρι για τον καναπέ του σαλονιού"),
    ("Chinese", "Han", "天蓝色天鹅绒抱枕，适用于客厅沙发"),
    ("Japanese", "Kana, Han", "リビングのソファ用の空色のベルベットクッション"),
    ("Korean", "Hangul", "거실 소파용 하늘색 벨벳 쿠션"),
    ("Arabic", "Arabic", "وسادة مخملية زرقاء سماوية لأريكة غرفة المعيشة"),
    ("Hebrew", "Hebrew", "כרית קטיפה בצבע תכלת לספה בסלון"),
    ("Hindi", "Devanagari", "लिविंग रूम के सोफे के लिए आसमानी नीला मखमली तकिया"),
    ("Thai", "Thai", "หมอนกำมะหยี่สีฟ้าสำหรับโซฟาในห้องนั่งเล่น"),
    ("emoji", "emoji", "😀 🛋️ 💙 👍 🔥"),
]


def default_tokenizer() -> Path:
    from rankserve.train.finetune import pretrained_encoder_dir

    return Path(pretrained_encoder_dir()) / "tokenizer.json"


def measure(tokenizer_json: str | Path) -> list[dict]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    unknown = unknown_token_id(tokenizer)
    rows = []
    for language, script, text in SAMPLES:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        unknowns = sum(1 for i in ids if i == unknown)
        rows.append({"language": language, "script": script, "tokens": len(ids), "unknown": unknowns,
                     "unknown_share": unknowns / len(ids) if ids else 0.0, "chars_per_token": len(text) / len(ids) if ids else 0.0})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| language | script | tokens | [UNK] | unknown share | characters per token |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['language']} | {r['script']} | {r['tokens']} | {r['unknown']} | {r['unknown_share']:.0%} | {r['chars_per_token']:.1f} |"
              for r in rows]
    return "\n".join(lines)


def counting_cost(tokenizer_json: str | Path, repeats: int = 15) -> list[tuple[int, float, float]]:
    """Median milliseconds of the tokenize stage's encoding of one request without and with the
    unknown-token counts, for 100 and 1000 WANDS-like candidates."""
    import statistics
    import tempfile
    import time

    from transformers import PreTrainedTokenizerFast

    from rankserve.builder.repository import write_serving_tokenizer
    from rankserve.data.wands import load_queries
    from rankserve.settings import TokenizeSettings
    from rankserve.stages.tokenize import encode_request, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), pad_token="[PAD]")
        tokenizer = load_tokenizer(write_serving_tokenizer(hf, Path(tmp) / "tokenizer.json"), TokenizeSettings())
    unknown = unknown_token_id(tokenizer)
    texts = [f"{q.text} | {q.query_class} product {i}" for i, q in enumerate(load_queries())]
    rows = []
    for n in (100, 1000):
        times = {False: [], True: []}
        for _ in range(repeats):
            for count in (False, True):
                start = time.perf_counter()
                encode_request(tokenizer, "turquoise pillows", texts[:n], (), unknown, count=count)
                times[count].append((time.perf_counter() - start) * 1e3)
        rows.append((n, statistics.median(times[False]), statistics.median(times[True])))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", help="a tokenizer.json (default: all-MiniLM-L6-v2's, the demo ranker's)")
    p.add_argument("--cost", action="store_true", help="also time the tokenize stage's encoding without and with the counts")
    args = p.parse_args(argv)
    path = args.tokenizer or default_tokenizer()
    print(f"tokenizer: {path}")
    print(table(measure(path)))
    if args.cost:
        for n, plain, counted in counting_cost(path):
            print(f"{n} candidates: encoding {plain:.2f} ms, with the counts {counted:.2f} ms (median)")


if __name__ == "__main__":
    main()
