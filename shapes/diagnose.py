"""What a trained shapes model knows, outside the server: does it meet SparseVLM's premise, and
what do its visual features hold?

    python -m shapes.diagnose --out docs/bench/diagnose.md

- Premise: for test questions that name visible objects, the share of those objects' patches
  among the top-K visual tokens by rater attention (SparseVLM v1.5: mean over its raters and
  heads) and by the last prompt position's attention (fastv-like), per decoder layer. Random
  keeps K/576 of them.
- Answer words: teacher-forced accuracy of each token of the "where" answers ("top", "-",
  "left", EOS), to see which half of the answer fails.
- Features: held-out accuracy of linear probes on the projected features of object patches, the
  tokens the language model reads: the patch's shape, colour and object quadrant, and which half
  of the image it is in.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from sparse_plugin import core
from sparse_plugin.reference.llava import llama_qk, prompt_embeds

from .task import GRID, chat_inputs, named_objects, patch_labels, sample
from .train import N_VISUAL, Encoder, batch_logits, image_features


@torch.no_grad()
def premise_recall(
    model, processor, n: int, layers: tuple[int, ...], budget: int
) -> dict[str, list[float]]:
    """Per scorer ("raters", "last position"), per layer: mean share of the named objects'
    patches kept in the top ``budget`` by that layer's attention."""
    lm = model.model.language_model
    kept: dict[str, list[list[float]]] = {"raters": [], "last position": []}
    for i in range(n):
        s = sample("test", i)
        named = torch.from_numpy(patch_labels(named_objects(s.question, s.objects))[0] > 0)
        if not named.any():  # "no" / "0" answers name nothing visible
            continue
        named = named.flatten()  # (576,)
        inputs = chat_inputs(processor, s)
        embeds, vs, n = prompt_embeds(model, inputs["input_ids"], inputs["pixel_values"])  # (L, d)
        raters = core.select_raters(embeds[vs : vs + n], embeds[vs + n :]) + vs + n
        last = torch.tensor([len(embeds) - 1])
        hidden = lm(inputs_embeds=embeds[None], output_hidden_states=True).hidden_states
        visual = slice(vs, vs + n)
        row = {name: [] for name in kept}
        for layer in layers:
            pos_emb = lm.rotary_emb(hidden[layer], torch.arange(len(embeds))[None])
            q, k = llama_qk(lm.layers[layer], hidden[layer], pos_emb)  # (1, H, L, dh), (1, Hkv, ..)
            for name, at in (("raters", raters), ("last position", last)):
                scores = core.score_v15(core.rater_attention(q[0][:, at], k[0], at, visual))
                top = scores.topk(budget).indices
                row[name].append(float(named[top].sum() / named.sum()))
        for name in kept:
            kept[name].append(row[name])
    return {name: np.mean(rows, axis=0).tolist() for name, rows in kept.items()}


@torch.no_grad()
def answer_token_accuracy(model, enc: Encoder, kind: str, n: int) -> list[tuple[str, float]]:
    """Teacher-forced accuracy of each answer token of ``n`` validation questions of ``kind``
    (answers of one token layout, as "where" has: word, "-", word, EOS)."""
    batch = [sample("val", i, kind=kind) for i in range(n)]
    logits, targets, _ = batch_logits(model, enc, batch, N_VISUAL, torch.Generator())
    hits = (logits.argmax(-1) == targets).view(n, -1).float().mean(0)  # (tokens,)
    example = targets.view(n, -1)[0]
    return [(enc.tok.decode([int(t)]), float(h)) for t, h in zip(example, hits, strict=True)]


def object_patch_features(model, n_images: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(P, d) projected features of the validation images' object patches and their labels."""
    feats, labels = [], []
    right_half = (torch.arange(N_VISUAL) % GRID >= GRID // 2).long()  # (576,)
    with torch.no_grad():
        for start in range(0, n_images, 50):
            batch = [sample("val", i) for i in range(start, min(n_images, start + 50))]
            f = image_features(model, batch)  # (B, 576, d)
            for b, s in enumerate(batch):
                lab = torch.from_numpy(patch_labels(s.objects)).flatten(1)  # (4, 576)
                on = lab[0] > 0
                feats.append(f[b][on])
                labels.append(torch.stack([lab[0], lab[1], lab[2], right_half])[:, on])
    y = torch.cat(labels, dim=1).long()
    names = ("shape", "colour", "quadrant", "right half")
    return torch.cat(feats), dict(zip(names, y, strict=True))


def linear_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy (last third) of a softmax classifier fitted on the first two thirds."""
    split = len(x) * 2 // 3
    x = (x - x[:split].mean(0)) / (x[:split].std(0) + 1e-6)
    classes = int(y.max()) + 1
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(x[:split] @ w + b, y[:split])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((x[split:] @ w + b).argmax(-1) == y[split:]).float().mean())


def report(model_dir: Path, questions: int, budget: int, layers: tuple[int, ...]) -> str:
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = LlavaProcessor.from_pretrained(model_dir)
    recall = premise_recall(model, processor, questions, layers, budget)
    tokens = answer_token_accuracy(model, Encoder(processor), "where", 60)
    x, labels = object_patch_features(model, 300)
    chance = {name: float(np.bincount(y.numpy()).max() / len(y)) for name, y in labels.items()}
    lines = [
        f"# What `{model_dir.name}` knows",
        "",
        f"`python -m shapes.diagnose --model {model_dir} --questions {questions} "
        f"--budget {budget}`",
        "",
        f"Share of the named objects' patches among the top {budget} of {N_VISUAL} visual tokens "
        f"({questions} test questions, those naming a visible object; random keeps "
        f"{budget / N_VISUAL:.2f}):",
        "",
        "| scored by | " + " | ".join(f"layer {i}" for i in layers) + " |",
        "|---|" + "---|" * len(layers),
        *(
            f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |"
            for name, vals in recall.items()
        ),
        "",
        'Teacher-forced accuracy of each token of 60 validation "where" answers: '
        + ", ".join(f"`{t!r}` {a:.2f}" for t, a in tokens)
        + ".",
        "",
        f"Linear probes on the projected features of {len(x):,} object patches of 300 validation "
        "images (held-out third; majority class in brackets): "
        + ", ".join(f"{n} {linear_probe(x, y):.2f} ({chance[n]:.2f})" for n, y in labels.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/shapes-llava"))
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = report(args.model, args.questions, args.budget, tuple(args.layers))
    if args.out:
        args.out.write_text(text)
    print(text)  # noqa: T201 - the report


if __name__ == "__main__":
    main()
