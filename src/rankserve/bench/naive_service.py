"""The bench's footnote, a strawman: FastAPI + the Hugging Face model in PyTorch FP32, no batching,
every pair padded to 128 tokens. Run: ``python -m rankserve.bench.naive_service RANKER_DIR PORT``."""


import sys


def make_app(ranker_dir: str):
    import torch
    from fastapi import FastAPI
    from pydantic import BaseModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from rankserve.builder.export import load_options

    tokenizer = AutoTokenizer.from_pretrained(ranker_dir, trust_remote_code=False)
    model = AutoModelForSequenceClassification.from_pretrained(ranker_dir, **load_options(ranker_dir)).eval()
    app = FastAPI()

    class RankRequest(BaseModel):
        query: str
        texts: list[str]

    @app.post("/rank")
    def rank(req: RankRequest):
        enc = tokenizer([req.query] * len(req.texts), req.texts, truncation=True, max_length=128,
                        padding="max_length", return_tensors="pt")
        with torch.inference_mode():
            scores = model(**enc).logits[:, 0].tolist()
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return {"indices": order, "scores": [scores[i] for i in order]}

    @app.get("/ready")
    def ready():
        return {"ready": True}

    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(make_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
