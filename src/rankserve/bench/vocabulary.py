"""Which languages a ranker's tokenizer can read: for one product-search phrase per language (the same
request, "sky-blue velvet pillow for the living-room sofa", in each), the tokens, how many are the
unknown token ([UNK]) and how finely the text is cut (characters per token).

    python -m rankserve.bench.vocabulary                       # the demo ranker's (all-MiniLM-L6-v2's) tokenizer
    python -m rankserve.bench.vocabulary --tokenizer model_repository/tokenize/1/tokenizer.json

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", help="a tokenizer.json (default: all-MiniLM-L6-v2's, the demo ranker's)")
    args = p.parse_args(argv)
    path = args.tokenizer or default_tokenizer()
    print(f"tokenizer: {path}")
    print(table(measure(path)))


if __name__ == "__main__":
    main()
