"""The server a user would write without this project: FastAPI + a transformers pipeline, full depth.

The same trained checkpoint, converted to a plain BertForSequenceClassification (backbone + the
final exit's pooler and classifier, which is exactly that architecture), answering POST /classify
in this project's response shape so the same load tester drives both.

    .venv/bin/python bench/baseline_server.py CHECKPOINT --port 8100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoTokenizer, BertForSequenceClassification, pipeline
from transformers.modeling_outputs import SequenceClassifierOutput

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebert.training.model import MultiExitBert, masked_mean  # noqa: E402


def final_exit_state(multi: MultiExitBert) -> dict[str, torch.Tensor]:
    """The multi-exit weights renamed to BertForSequenceClassification's: backbone + final exit."""
    last = multi.num_layers - 1
    state = {f"bert.{k.replace('layers.', 'encoder.layer.', 1)}": v for k, v in multi.state_dict().items() if not k.startswith("exits.")}
    state |= {f"bert.pooler.{k}": v for k, v in multi.exits[last].pooler.state_dict().items()}
    return state | {f"classifier.{k}": v for k, v in multi.exits[last].classifier.state_dict().items()}


class MeanPooledClassifier(BertForSequenceClassification):
    """BERT classifier whose pooler reads the mean of the real tokens, as a mean-pooled final exit does."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        pooled = masked_mean(hidden, attention_mask)
        return SequenceClassifierOutput(logits=self.classifier(self.bert.pooler.activation(self.bert.pooler.dense(pooled))))


def to_sequence_classifier(checkpoint: Path) -> BertForSequenceClassification:
    multi = MultiExitBert.from_checkpoint(checkpoint)
    mean = getattr(multi.config, "exit_pooling", "cls") == "mean"
    model = (MeanPooledClassifier if mean else BertForSequenceClassification)(multi.config)
    missing, unexpected = model.load_state_dict(final_exit_state(multi), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model.eval()


class Body(BaseModel):
    text: str | list[str]


def make_app(checkpoint: Path) -> FastAPI:
    model = to_sequence_classifier(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    max_length = int(getattr(model.config, "max_seq_length", 128))
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer, device=-1, truncation=True, max_length=max_length)
    layers = model.config.num_hidden_layers
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict:
        return {"ready": True}

    @app.post("/classify")
    def post(body: Body) -> dict:
        started = time.perf_counter()
        texts = [body.text] if isinstance(body.text, str) else body.text
        with torch.inference_mode():
            out = classify(texts)
        results = [{"label": o["label"], "exit_layer": layers, "layers_used": layers, "budget_exhausted": False, "truncated": False} for o in out]
        return {"results": results, "latency_ms": 1000 * (time.perf_counter() - started)}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    uvicorn.run(make_app(args.checkpoint), host="127.0.0.1", port=args.port, log_level="warning")
