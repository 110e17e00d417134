"""Train the bundled shapes model: a small LLaVA-1.5 from scratch on the shapes task, on CPU.

    python -m shapes.train --out models/shapes-llava          # the committed checkpoint
    python -m shapes.train --steps 50 --out /tmp/try          # a smoke run

Architecture as llava-hf/llava-1.5 (CLIP ViT-336/14 -> 576 tokens, 2-layer GELU projector,
Llama LM, the fixture's BPE tokenizer and chat template); saved in the llava-hf layout so vLLM
loads it unchanged. Every batch is drawn from the task's "train" split by step number, so a run
is a function of (seed, config) up to floating-point reduction order.

Auxiliary signal (``--aux-weight``): a linear head reads each of the 576 projected patch features
and predicts that patch's shape, colour, object quadrant and "object centre here" (from the scene,
``shapes.task.patch_labels``). It gives the vision tower dense supervision so that the language
model has something to look for; the head is training-only and is not saved.

Conversations (``--turns``): each training image comes with up to that many questions as a
multi-turn chat, LLaVA's own training format; the first turn is exactly the single-turn prompt
served and scored, the later ones (``shapes.task.follow_ups``, as many rounds over the question
types as needed) give the language model more answers per image encoded.

Grounding (``--ground-weight``, ``--ground-layers``): a training-only loss on decoder layers'
attention from each position that predicts a word of the answer (for "top-left" also the one after
"top-", where left/right is decided): -log of the attention mass (mean over heads) on the patches
of the objects the question names. Real VLMs learn to look where the question points from data at
scale; this gives a 2-core budget the same behaviour. With ``--ground-question`` the question's
own positions from its last naming word on ("... blue circle? ASSISTANT:") are trained the same
way: SparseVLM's raters are question words, fastv's query is the answer position. Earlier
positions ("What", "Is there") cannot know the objects yet and are left alone. The bundled model
grounds layers 1-2; scoring at layer 0 shows the methods without a trained signal.

Augmentation (``--drop-prob``): on that share of steps each image keeps a random subset of its
576 tokens, positions compacted as the plugin compacts them. ``--focus-prob``: on that share of
steps the subset is foreground-first (object patches in random order, then background), the kind
of set a question-guided method leaves, so the model learns to count and locate without the
background around the objects. Neither looks at the question or at any model's attention. Every
method compared in the accuracy benchmark is served by this same model.

Position code (``--position-code``): adds a fixed 2-D sin-cos code, at that scale, to the CLIP
position table of the starting model (``add_position_code``), so that the patch features, and
with them the kept tokens after compaction, carry their row and column. Without it the learned
table is swamped by the patch embeddings and the model cannot tell left from right.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from sparse_plugin.core import rater_attention
from sparse_plugin.fixtures.llava import (
    CLIP_MEAN,
    CLIP_STD,
    build_tokenizer_and_processor,
    llava_config,
    save_llava,
)
from sparse_plugin.reference.llava import llama_qk, visual_features

from .task import (
    COLORS,
    QUADRANTS,
    QUESTION_TYPES,
    SHAPES,
    Sample,
    chat_prompt,
    follow_ups,
    named_objects,
    naming_end,
    patch_labels,
    sample,
)

N_VISUAL = 576
AUX_CLASSES = (len(SHAPES) + 1, len(COLORS) + 1, len(QUADRANTS) + 1, 2)


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 3000
    batch_size: int = 24
    lr: float = 2e-3
    warmup: int = 150
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    ground_weight: float = 0.0  # attention grounding loss (0 = off)
    ground_layers: str = "1"  # comma-separated decoder layers the grounding loss is applied at
    ground_question: bool = False  # also ground question positions from the last naming word on
    turns: int = 5  # questions per training conversation (the first is the single-turn prompt)
    drop_prob: float = 0.3  # share of steps trained on a random subset of the visual tokens
    min_keep: int = 32
    max_keep: int = 575  # dropped steps keep a uniform count in [min_keep, max_keep]
    focus_prob: float = 0.0  # share of steps keeping mostly object patches (see keep_indices)
    focus_min_keep: int = 48
    focus_max_keep: int = 256
    vision_hidden: int = 64
    vision_layers: int = 3
    text_hidden: int = 128
    text_layers: int = 4
    val_size: int = 500
    eval_every: int = 0  # >0: every that many steps, 100 val questions + a checkpoint save
    init: str = ""  # checkpoint to continue from ("" = from scratch)
    data_offset: int = 0  # first training batch index (a continued run takes unseen batches)
    position_code: float = 0.0  # scale of the 2-D sin-cos code added to the ViT's position table


def model_config(cfg: TrainConfig, vocab_size: int, image_token_id: int):
    config = llava_config(
        vocab_size=vocab_size,
        image_token_id=image_token_id,
        vision={
            "hidden_size": cfg.vision_hidden,
            "intermediate_size": 2 * cfg.vision_hidden,
            "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": 4,
            "projection_dim": cfg.vision_hidden,
        },
        text={
            "hidden_size": cfg.text_hidden,
            "intermediate_size": 3 * cfg.text_hidden,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_hidden // 32,  # head_dim 32 (vLLM CPU attention)
            "num_key_value_heads": cfg.text_hidden // 64,
        },
    )
    config.vision_feature_layer = -1  # every ViT layer feeds the projector (llava-hf uses -2)
    return config


def pixels(images: list) -> torch.Tensor:
    """(B, 3, 336, 336) normalised as CLIPImageProcessor does for a 336x336 RGB image."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]))
    x = x.permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class Encoder:
    """Prompt text -> (ids before the image, ids after it); answers -> target ids + EOS."""

    def __init__(self, processor: LlavaProcessor):
        self.tok = processor.tokenizer
        self.processor = processor
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self._naming: dict[tuple[tuple[int, ...], str], int] = {}  # templates repeat: cache

    def prompt(self, question: str) -> tuple[list[int], list[int]]:
        ids = self.tok(chat_prompt(self.processor, question), add_special_tokens=True)["input_ids"]
        at = ids.index(self.image_id)
        return ids[:at], ids[at + 1 :]

    def turn(self, question: str) -> list[int]:
        """A later user turn of a conversation, ending where the assistant's answer starts."""
        return self.tok.encode(f"USER: {question} ASSISTANT:", add_special_tokens=False)

    def answer(self, answer: str) -> list[int]:
        return self.tok.encode(" " + answer, add_special_tokens=False) + [self.tok.eos_token_id]

    def naming_token(self, asked: list[int], question: str) -> int:
        """Index in ``asked`` (a turn's tokens, ``question`` among them) of the token completing
        the question's last naming word; the last index when it names nothing."""
        key = (tuple(asked), question)
        if key not in self._naming:
            end = naming_end(question)
            need = self.tok.decode(asked).index(question) + end
            ends = (t for t in range(len(asked)) if len(self.tok.decode(asked[: t + 1])) >= need)
            self._naming[key] = next(ends) if end else len(asked) - 1
        return self._naming[key]


def image_features(model: LlavaForConditionalGeneration, batch: list[Sample]) -> torch.Tensor:
    """(B, 576, d) projected patch features: what the language model receives."""
    return visual_features(model, pixels([s.image for s in batch])).reshape(
        len(batch), N_VISUAL, -1
    )


def aux_loss(head: torch.nn.Linear, feats: torch.Tensor, batch: list[Sample]) -> torch.Tensor:
    """Mean cross-entropy of the per-patch facts (shape, colour, quadrant, centre)."""
    labels = torch.from_numpy(np.stack([patch_labels(s.objects) for s in batch]))  # (B,4,24,24)
    labels = labels.flatten(2)  # (B, 4, 576)
    logits = head(feats).split(AUX_CLASSES, dim=-1)  # 4 x (B, 576, classes)
    losses = [F.cross_entropy(lg.flatten(0, 1), labels[:, i].flatten())
              for i, lg in enumerate(logits)]  # fmt: skip
    return torch.stack(losses).mean()


def grounding_loss(
    lm, hidden: torch.Tensor, layer: int, visual: slice, probes: list[list[tuple[int, np.ndarray]]]
) -> torch.Tensor:
    """Mean over answer positions of -log(head-mean attention mass at ``layer`` on the patches
    of the objects their question names). ``hidden``: (B, L, d), that layer's input; ``probes``:
    per row, (answer position, (Nv,) bool mask of the named objects' visual tokens)."""
    pos_emb = lm.rotary_emb(hidden, torch.arange(hidden.shape[1])[None])
    q, k = llama_qk(lm.layers[layer], hidden, pos_emb)  # (B, H, L, dh), (B, Hkv, L, dh)
    losses = []
    for b, row in enumerate(probes):
        row = [(p, m) for p, m in row if m.any()]  # "no"/"0" answers name nothing visible
        if not row:
            continue
        at = torch.tensor([p for p, _ in row])
        probs = rater_attention(q[b][:, at], k[b], at, visual).mean(0)  # (R, Nv)
        on = torch.from_numpy(np.stack([m for _, m in row]))
        losses.append(-torch.log((probs * on).sum(-1) + 1e-6))
    return torch.cat(losses).mean() if losses else hidden.new_zeros(())


def keep_indices(s: Sample, keep: int, gen: torch.Generator, focus: bool = False) -> torch.Tensor:
    """(keep,) sorted visual-token indices an image keeps: a random subset, or with ``focus`` its
    object patches first (random among them) and then random background. Sorted, so positions
    compact in the original order as in serving."""
    score = torch.rand(N_VISUAL, generator=gen)  # (576,)
    if focus:
        score += torch.from_numpy(patch_labels(s.objects)[0].flatten() > 0)
    return score.topk(keep).indices.sort().values


def batch_logits(
    model: LlavaForConditionalGeneration,
    enc: Encoder,
    batch: list[Sample],
    keep: int,
    gen: torch.Generator,
    feats: torch.Tensor | None = None,
    follow: list[list[tuple[str, str]]] | None = None,
    ground_layers: tuple[int, ...] = (),
    focus: bool = False,
    ground_question: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Teacher-forced logits at the answer positions and their targets, (n, V) and (n,), and the
    grounding loss averaged over ``ground_layers`` (None when none); ``ground_question``: the
    question's positions from its last naming word on are grounded along with the answer's.

    ``follow``: per sample, further (question, answer) turns appended as a multi-turn chat; the
    first turn is always exactly the served single-turn prompt. ``keep`` < 576: each image keeps
    that many tokens (``keep_indices``)."""
    if feats is None:
        feats = image_features(model, batch)  # (B, 576, d)
    idx = torch.arange(N_VISUAL).expand(len(batch), -1)
    if keep < N_VISUAL:
        idx = torch.stack([keep_indices(s, keep, gen, focus) for s in batch])  # (B, keep)
        feats = torch.gather(feats, 1, idx[..., None].expand(-1, -1, feats.shape[-1]))
    embed = model.model.language_model.embed_tokens
    rows, targets, target_pos = [], [], []
    probes: list[list[tuple[int, np.ndarray]]] = []
    for b, s in enumerate(batch):
        pre, post = enc.prompt(s.question)
        turns = [(s.question, post, enc.answer(s.answer))]
        turns += [(q, enc.turn(q), enc.answer(a)) for q, a in (follow[b] if follow else [])]
        text: list[int] = []
        tgt: list[int] = []
        pos: list[int] = []
        probes.append([])
        for question, asked, answer in turns:
            text += asked
            start = len(pre) + keep + len(text) - 1  # its next token is the answer's first
            tgt += answer
            pos += range(start, start + len(answer))
            text += answer
            if ground_layers:
                named = patch_labels(named_objects(question, s.objects))[0].flatten() > 0
                first = start
                if ground_question:
                    first -= len(asked) - 1 - enc.naming_token(asked, question)
                last = start + len(answer) - 2  # every position predicting a word of the answer
                kept = named[idx[b].numpy()]  # (keep,)
                probes[b] += [(p, kept) for p in range(first, last + 1)]
        text = text[:-1]  # the final EOS is only a target
        rows.append(torch.cat([embed(torch.tensor(pre)), feats[b], embed(torch.tensor(text))]))
        targets.append(torch.tensor(tgt))
        target_pos.append(torch.tensor(pos))
    length = max(r.shape[0] for r in rows)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    padded = torch.zeros(len(rows), length, rows[0].shape[-1])
    for b, r in enumerate(rows):
        padded[b, : r.shape[0]] = r
        mask[b, : r.shape[0]] = 1
    lm = model.model.language_model
    out = lm(inputs_embeds=padded, attention_mask=mask, output_hidden_states=bool(ground_layers))
    batch_idx = torch.cat([torch.full_like(p, b) for b, p in enumerate(target_pos)])
    logits = model.lm_head(out.last_hidden_state[batch_idx, torch.cat(target_pos)])
    ground = None
    if ground_layers:
        visual = slice(len(pre), len(pre) + keep)  # the prefix before the image is fixed
        ground = torch.stack(
            [grounding_loss(lm, out.hidden_states[i], i, visual, probes) for i in ground_layers]
        ).mean()
    return logits, torch.cat(targets), ground


def answers_correct(logits: torch.Tensor, targets: torch.Tensor, lengths: list[int]) -> list[bool]:
    """Per sample: every answer token (and EOS) is the argmax, i.e. greedy decoding is exact."""
    hits = (logits.argmax(-1) == targets).split(lengths)
    return [bool(h.all()) for h in hits]


@torch.no_grad()
def evaluate(
    model, enc: Encoder, split: str, n: int, keep: int = N_VISUAL, focus: bool = False
) -> dict[str, float]:
    model.eval()
    gen = torch.Generator().manual_seed(0)
    per_kind: dict[str, list[bool]] = {k: [] for k in QUESTION_TYPES}
    for start in range(0, n, 50):
        batch = [sample(split, i) for i in range(start, min(n, start + 50))]
        logits, targets, _ = batch_logits(model, enc, batch, keep, gen, focus=focus)
        lengths = [len(enc.answer(s.answer)) for s in batch]
        for s, ok in zip(batch, answers_correct(logits, targets, lengths), strict=True):
            per_kind[s.kind].append(ok)
    model.train()
    acc = {k: sum(v) / len(v) for k, v in per_kind.items() if v}
    acc["all"] = sum(sum(v) for v in per_kind.values()) / n
    return acc


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) fixed position code, row-major like the patches: the first half of the
    channels codes the column, the second the row, each as sin and cos at dim // 4 frequencies."""
    n = dim // 4
    angles = torch.arange(grid).float()[:, None] / 100 ** (torch.arange(n) / n)  # (grid, n)
    code = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, dim // 2)
    column = code[None].expand(grid, grid, -1)
    row = code[:, None].expand(grid, grid, -1)
    return torch.cat([column, row], dim=-1).reshape(grid * grid, dim)


@torch.no_grad()
def add_position_code(model: LlavaForConditionalGeneration, scale: float) -> None:
    """Add ``scale`` x a 2-D sin-cos code to the patch rows of the CLIP position table, in place.

    The learned table starts at norm ~1 while patch embeddings grow to ~60, so after the ViT's
    pre-LayerNorm the patch position is lost: linear probes on the stage-5 features read the
    object's quadrant at chance, and the answer to "where" is left/right at chance. The code is
    a change of weights, not of architecture: the checkpoint stays a plain llava-hf one."""
    table = model.model.vision_tower.embeddings.position_embedding.weight  # (1 + 576, d)
    grid = int(math.isqrt(table.shape[0] - 1))
    table[1:] += scale * sincos_2d(grid, table.shape[1])


def ground_layers(cfg: TrainConfig) -> tuple[int, ...]:
    return tuple(int(x) for x in cfg.ground_layers.split(","))


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig, out: Path, log_every: int = 50) -> dict:
    torch.manual_seed(cfg.seed)
    processor = build_tokenizer_and_processor()
    tok = processor.tokenizer
    if cfg.init:  # continue from an earlier run's checkpoint (new data: see data_offset)
        model = LlavaForConditionalGeneration.from_pretrained(cfg.init, dtype=torch.float32)
    else:
        model = LlavaForConditionalGeneration(
            model_config(cfg, len(tok), tok.convert_tokens_to_ids("<image>"))
        )
    if cfg.position_code:
        add_position_code(model, cfg.position_code)
    model.train()
    enc = Encoder(processor)
    head = torch.nn.Linear(cfg.text_hidden, sum(AUX_CLASSES))  # training-only, not saved
    params = [*model.named_parameters(), *(("aux." + n, p) for n, p in head.named_parameters())]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.monotonic()
    history = []
    for step in range(cfg.steps):
        first = (cfg.data_offset + step) * cfg.batch_size
        batch = [sample("train", first + i) for i in range(cfg.batch_size)]
        keep, focus, draw = N_VISUAL, False, rng.random()
        if draw < cfg.drop_prob:
            keep = int(rng.integers(cfg.min_keep, cfg.max_keep + 1))
        elif draw < cfg.drop_prob + cfg.focus_prob:
            keep = int(rng.integers(cfg.focus_min_keep, cfg.focus_max_keep + 1))
            focus = True
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        feats = image_features(model, batch)
        rounds = -(-(cfg.turns - 1) // len(QUESTION_TYPES))  # enough rounds for the turns asked
        follow = [
            [qa for qa in follow_ups("train", first + i, s.objects, rounds) if qa[0] != s.question]
            for i, s in enumerate(batch)
        ]
        follow = [f[: cfg.turns - 1] for f in follow]
        grounded = ground_layers(cfg) if cfg.ground_weight > 0 else ()
        logits, targets, ground = batch_logits(
            model, enc, batch, keep, gen, feats, follow, grounded, focus, cfg.ground_question
        )
        loss = F.cross_entropy(logits, targets)
        aux = aux_loss(head, feats, batch)
        total = loss + cfg.aux_weight * aux
        if ground is not None:
            total = total + cfg.ground_weight * ground
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            entry = {
                "step": step,
                "aux": round(aux.item(), 4),
                "ground": round(ground.item(), 4) if ground is not None else None,
                "loss": round(loss.item(), 4),
                "keep": keep,
                "focus": focus,
                "minutes": round((time.monotonic() - t0) / 60, 2),
            }
            if cfg.eval_every and step and step % cfg.eval_every == 0:
                entry["val100"] = round(evaluate(model, enc, "val", 100)["all"], 3)
                focused = evaluate(model, enc, "val", 100, keep=64, focus=True)["all"]
                entry["val100_focus64"] = round(focused, 3)
                save_llava(model, processor, out)  # a run stopped early keeps its progress
            history.append(entry)
            print(json.dumps(entry), flush=True)  # noqa: T201 - training progress
    minutes = (time.monotonic() - t0) / 60
    val = evaluate(model, enc, "val", cfg.val_size)
    model.eval()
    save_llava(model, processor, out)
    report = {
        "config": asdict(cfg),
        "train_minutes": round(minutes, 1),
        "val_accuracy_full_tokens": {k: round(v, 4) for k, v in val.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(model_card(report))
    return report


def model_card(report: dict) -> str:
    cfg, val = report["config"], report["val_accuracy_full_tokens"]
    default = asdict(TrainConfig())
    flags = " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in cfg.items()
        if k in default and v != default[k]
    )
    accuracy = ", ".join(f"{k} {v:.3f}" for k, v in val.items())
    lines = [
        "# shapes-llava",
        "",
        "The bundled default model of `sparsevlm serve`: the LLaVA-1.5 architecture (CLIP",
        "ViT-336/14 -> 576 visual tokens, 2-layer GELU projector, Llama LM) trained from scratch",
        "on the shapes task (`shapes/task.py`) by `shapes/train.py`, saved in the llava-hf",
        "layout; vLLM loads it unchanged.",
        "",
        f"- Parameters: {report['parameters']:,}; vision tower {cfg['vision_layers']} layers x "
        f"{cfg['vision_hidden']}, language model {cfg['text_layers']} layers x "
        f"{cfg['text_hidden']} (head dim 32).",
        f"- Training: {cfg['steps']} steps x {cfg['batch_size']} images of the train split, "
        f"AdamW lr {cfg['lr']} (warm-up {cfg['warmup']}, cosine), seed {cfg['seed']}; "
        f"{report['train_minutes']} min on {report['threads']} CPU threads "
        f"({report['machine']}, torch {report['torch']}).",
        f"- Conversations of up to {cfg['turns']} questions per image; the first turn is the "
        "single-turn prompt that is served and scored.",
        f"- Auxiliary per-patch loss (weight {cfg['aux_weight']}, training only, head not saved).",
        *(
            [
                f"- Grounding loss at decoder layers {cfg['ground_layers']} (weight "
                f"{cfg['ground_weight']}, training only): the attention of the positions that",
                "  predict the answer's words"
                + (
                    ", and of the question's from its last naming word on,"
                    if cfg["ground_question"]
                    else ""
                )
                + " is pulled onto the patches of the objects the question names.",
            ]
            if cfg.get("ground_weight")
            else []
        ),
        *(
            [
                f"- A fixed 2-D sin-cos code (x {cfg['position_code']}) was added to the vision "
                "tower's position table at the start of the run, so patch features carry their "
                "row and column.",
            ]
            if cfg.get("position_code")
            else []
        ),
        f"- Random visual-token dropping on {cfg['drop_prob']:.0%} of steps (keep "
        f"{cfg['min_keep']}-{cfg['max_keep']}, positions compacted as in serving). Every method",
        "  in the accuracy benchmark is served by this same model.",
        f"- Validation accuracy, all 576 tokens, {cfg['val_size']} questions: {accuracy}.",
        "",
        "Accuracy per visual-token budget and method, through the server:",
        "[docs/bench/accuracy.md](../../docs/bench/accuracy.md).",
        "",
        f"Reproduce: `python -m shapes.train --out models/shapes-llava {flags}`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/shapes-llava"))
    for field, default in asdict(TrainConfig()).items():
        flag = f"--{field.replace('_', '-')}"
        if isinstance(default, bool):  # type=bool would read "False" as True
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = vars(parser.parse_args())
    out = args.pop("out")
    report = train(TrainConfig(**args), out)
    print(json.dumps({k: report[k] for k in ("train_minutes", "val_accuracy_full_tokens")}))  # noqa: T201


if __name__ == "__main__":
    main()
