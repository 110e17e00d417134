"""shapes-video-qwen: a Qwen2.5-VL whose weights are *constructed* to answer the shapes video task.

Not trained: each part computes something chosen by hand (as sparse_plugin/fixtures/guided.py
does for images), except the last linear read-out, fitted by least squares on rendered shapes.
The checkpoint is a plain Qwen2.5-VL one (the fixtures' tokenizer and chat template); vLLM
serves it unchanged, with or without the plugin.

Vision tower (per 14x14 patch, both frames of a temporal pair):
- the processor normalises pixels to ``raw + 20`` (mean -20, std 1), so one all-positive conv
  channel is a near-constant ~20 that keeps the merger's RMSNorm a fixed scale, and zero-sum
  channels are exact linear functions of the pixels: the hue (u, v) of the patch (zero for
  black, grey and white) and six brightness contrasts (top-bottom, left-right, two diagonals,
  corners-centre, centre-ring) that tell circle, square and triangle apart;
- the blocks are residual pass-throughs; the merger concatenates a cell's 4 patches and maps them
  (linearly: its GELU runs far in the positive range) to the LM's embedding: a small constant,
  the cell's hue (large) and its 4 x 8 patch features (small).
LM (4 layers, hidden 64, 2 heads of 32, 1 KV head, M-RoPE; codes on the slowest rotary pairs):
- embeddings: " red", " green", " blue" carry a flag and their hue; "\\n" a bias; all else 0;
- layer 0, head 0: a constant query finds the flagged colour word (the latest one, in a
  multi-turn chat: a rotary code favours the nearest); every later position copies its hue (the
  asked colour) into a query slot;
- layer 1: nothing;
- layer 2, head 0: the query slot's hue meets the video tokens' hue: attention lands on the
  asked object's token(s), wherever and whenever they are; their patch features go through the
  fitted read-out into three answer dims;
- lm_head: those dims (+ the bias) score " circle", " square", " triangle"; every other word 0.
So the answer is right exactly when the asked object's token reaches the LM, and SparseVLM's
raters (the question's words at layer 2, the default ``score_layer``) point at that token.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from shapes.task import SHAPES
from shapes.video_task import GRID, SIZE, TARGETS, draw_shape
from sparse_plugin.fixtures.checkpoint import save_checkpoint
from sparse_plugin.fixtures.qwen2_5_vl import (
    QWEN_CHAT_TEMPLATE,
    build_qwen_tokenizer,
    tiny_lm,
    to_qwen_hub_layout,
    vision_config,
    vision_token_ids,
)

PIXEL_MEAN, PIXEL_STD = -20.0, 1.0  # normalised pixel = raw + 20 (see the module docstring)
N_FEAT = 8  # per patch: hue u, hue v, 6 brightness contrasts
# LM residual dims
D_CONST, D_HUE, D_PATCH = 0, slice(1, 3), slice(3, 3 + 4 * N_FEAT)  # video tokens
D_FLAG, D_WORD = 35, slice(36, 38)  # colour words
D_ASKED = slice(38, 40)  # layer 0's output: the asked hue
D_ANSWER = slice(40, 43)  # layer 2's output: circle, square, triangle
D_BIAS = 43  # "\n"
# scales
VISUAL_CONST, HUE_SCALE, PATCH_SCALE = 1.0, 30.0, 4.0
MERGER_SHIFT, MERGER_GAIN = 8.0, 0.5  # keeps the merger's GELU input near 8: GELU(x) = x there
FIND_WORD_GAIN, FIND_OBJECT_GAIN, ANSWER_GAIN, ANSWER_BIAS = 10.0, 1.5, 4.0, 8.0
SLOW = (15, 14, 13)  # rotary pairs used for q.k codes: the slowest (< 0.03 rad over 1k tokens)
# Rotary pair 6 turns 5.6e-3 rad a token: its cos falls monotonically over the first ~560 tokens,
# by ~0.02 between one question's colour word and the next turn's: x RECENCY_GAIN, a clear margin.
RECENCY_PAIR, RECENCY_GAIN = 6, 400.0


def hue(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 2): the colour's hue vector (zero for black, grey, white)."""
    r, g, b = rgb.unbind(-1)
    return torch.stack([r - (g + b) / 2, (g - b) * math.sqrt(3) / 2], -1)


def patch_masks() -> torch.Tensor:
    """(6, 14, 14) zero-sum brightness contrasts, each with unit absolute sum."""
    y, x = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    centre = (y - 6.5).abs().maximum((x - 6.5).abs())
    masks = [
        (y < 7).float() - (y >= 7).float(),
        (x < 7).float() - (x >= 7).float(),
        (x > y).float() - (x < y).float(),
        (x + y < 13).float() - (x + y > 13).float(),
        (centre >= 4).float() * ((y - 6.5).abs() >= 4).float() * ((x - 6.5).abs() >= 4).float()
        - (centre < 2).float() * 4,  # 4 corners of 3x3 (36 px) vs the 4x4 centre (16 px x 4)
        (centre < 3.5).float() - (centre >= 3.5).float() * (64 / 132),  # centre 8x8 vs the ring
    ]
    masks = [m - m.mean() for m in masks]  # exactly zero-sum
    return torch.stack([m / m.abs().sum() for m in masks])


def build_processor() -> Qwen2_5_VLProcessor:
    tok = build_qwen_tokenizer(QWEN_CHAT_TEMPLATE)
    norm = {"image_mean": [PIXEL_MEAN] * 3, "image_std": [PIXEL_STD] * 3}
    pixels = dict(min_pixels=56 * 56, max_pixels=SIZE * SIZE, patch_size=14, merge_size=2,
                  temporal_patch_size=2, **norm)  # fmt: skip
    size = {"shortest_edge": 56 * 56, "longest_edge": SIZE * SIZE}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(
            size=size, patch_size=14, merge_size=2, temporal_patch_size=2, **norm
        ),  # fmt: skip
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def _rotary_slot(head_dim: int, pair: int) -> tuple[int, int]:
    """Both halves of a rotary pair (neox layout): a code written to both rotates as one."""
    return pair, pair + head_dim // 2


@torch.no_grad()
def _construct_vision(model: Qwen2_5_VLForConditionalGeneration) -> None:
    vt = model.model.visual
    conv = vt.patch_embed.proj.weight  # (c, 3, 2, 14, 14)
    conv.zero_()
    n = 2 * 14 * 14
    conv[0] = 1.0 / (3 * n)  # ~20: the constant
    u, v = hue(torch.eye(3)).T  # per input channel
    for c in range(3):
        conv[1, c] = u[c] / n
        conv[2, c] = v[c] / n
    for k, mask in enumerate(patch_masks()):
        conv[3 + k] = mask / (3 * 2)  # brightness (R+G+B)/3 over both frames
    for block in vt.blocks:  # residual pass-through
        for p in (block.attn.proj.weight, block.attn.proj.bias, block.mlp.down_proj.weight,
                  block.mlp.down_proj.bias):  # fmt: skip
            p.zero_()
    merger = vt.merger
    merger.ln_q.weight.fill_(1.0)
    hidden = conv.shape[0]
    lin1, lin2 = merger.mlp[0], merger.mlp[2]
    feats = [p * hidden + 1 + f for p in range(4) for f in range(N_FEAT)]  # skip each constant
    lin1.weight.zero_()
    lin1.bias.zero_()
    for i, j in enumerate(feats):
        lin1.weight[i, j] = MERGER_GAIN
        lin1.bias[i] = MERGER_SHIFT
    # lin2 reads x_i = (GELU out_i - shift) / gain, i.e. the patch features, linearly
    x_map = torch.zeros(lin2.weight.shape[0], len(feats))  # LM dims <- features
    for p in range(4):
        x_map[D_HUE, p * N_FEAT : p * N_FEAT + 2] = torch.eye(2) * HUE_SCALE
    x_map[D_PATCH, :] = torch.eye(len(feats)) * PATCH_SCALE
    lin2.weight.zero_()
    lin2.weight[:, : len(feats)] = x_map / MERGER_GAIN
    lin2.bias.copy_(-x_map.sum(1) * MERGER_SHIFT / MERGER_GAIN)
    lin2.bias[D_CONST] += VISUAL_CONST


@torch.no_grad()
def _construct_lm(model: Qwen2_5_VLForConditionalGeneration, tok) -> None:
    lm = model.model.language_model
    for name, p in lm.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()
    model.lm_head.weight.zero_()
    emb = lm.embed_tokens.weight
    for color, rgb in TARGETS.items():
        (t,) = tok.encode(f" {color}", add_special_tokens=False)
        emb[t, D_FLAG] = 1.0
        emb[t, D_WORD] = hue(torch.tensor(rgb, dtype=torch.float32) / 255)
    (newline,) = tok.encode("\n", add_special_tokens=False)
    emb[newline, D_BIAS] = 1.0
    dh = lm.config.hidden_size // lm.config.num_attention_heads
    a0, a2 = lm.layers[0].self_attn, lm.layers[2].self_attn
    # layer 0, head 0: constant query x flag key; value = the word's hue -> D_ASKED. A second
    # code on a faster rotary pair (cos falls with distance) makes the latest colour word win.
    for i in _rotary_slot(dh, SLOW[0]):
        a0.q_proj.bias[i] = FIND_WORD_GAIN
        a0.k_proj.weight[i, D_FLAG] = 1.0
    for i in _rotary_slot(dh, RECENCY_PAIR):
        a0.q_proj.bias[i] = RECENCY_GAIN
        a0.k_proj.weight[i, D_FLAG] = 1.0
    a0.v_proj.weight[0:2, D_WORD] = torch.eye(2)
    a0.o_proj.weight[D_ASKED, 0:2] = torch.eye(2)
    # layer 2, head 0: asked hue x video hue; value = the cell's patch features -> answer dims
    for k, pair in enumerate(SLOW[1:]):
        for i in _rotary_slot(dh, pair):
            a2.q_proj.weight[i, D_ASKED.start + k] = FIND_OBJECT_GAIN
            a2.k_proj.weight[i, D_HUE.start + k] = 1.0
    n_patch = D_PATCH.stop - D_PATCH.start
    a2.v_proj.weight[0:n_patch, D_PATCH] = torch.eye(n_patch)
    for k, shape in enumerate(SHAPES):
        (t,) = tok.encode(f" {shape}", add_special_tokens=False)
        model.lm_head.weight[t, D_ANSWER.start + k] = ANSWER_GAIN
        model.lm_head.weight[t, D_BIAS] = ANSWER_BIAS


def single_object_frames(shape: str, color: str, cell: tuple[int, int]) -> list[Image.Image]:
    """Two identical frames (one temporal token) with one shape in ``cell``."""
    image = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    draw_shape(ImageDraw.Draw(image), shape, cell, TARGETS[color])
    return [image, image]


@torch.no_grad()
def cell_values(model, processor, frames: list[Image.Image]) -> torch.Tensor:
    """(tokens, 4 x N_FEAT): layer 2's value inputs (normalised patch features) of a clip."""
    video = processor.video_processor(videos=[frames], return_tensors="pt")
    emb = model.model.visual(video["pixel_values_videos"], grid_thw=video["video_grid_thw"])
    emb = getattr(emb, "pooler_output", emb)
    x = model.model.language_model.layers[2].input_layernorm(emb)
    return x[:, D_PATCH]


@torch.no_grad()
def _fit_readout(model, processor) -> float:
    """Least-squares read-out: a cell's normalised patch features -> one-hot shape. Fitted on
    every (shape, target colour, cell) of one grid; returns the fit's accuracy."""
    xs, ys = [], []
    for shape_i, shape in enumerate(SHAPES):
        for color in TARGETS:
            for r in range(GRID):
                for c in range(GRID):
                    x = cell_values(model, processor, single_object_frames(shape, color, (r, c)))
                    xs.append(x[r * GRID + c])
                    ys.append(shape_i)
    x = torch.stack(xs).double()
    y = torch.nn.functional.one_hot(torch.tensor(ys), len(SHAPES)).double() * 2 - 1
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    w = torch.linalg.lstsq(x1, y, driver="gelsd").solution  # (4 N_FEAT + 1, 3)
    accuracy = float(((x1 @ w).argmax(1) == torch.tensor(ys)).double().mean())
    a2 = model.model.language_model.layers[2].self_attn
    n_patch = D_PATCH.stop - D_PATCH.start
    a2.o_proj.weight[D_ANSWER, 0:n_patch] = w[:-1].T.float()
    # the intercept rides on the bias dim ("\n", exactly 1 at the answer position)
    for k, shape in enumerate(SHAPES):
        (t,) = processor.tokenizer.encode(f" {shape}", add_special_tokens=False)
        model.lm_head.weight[t, D_BIAS] += ANSWER_GAIN * float(w[-1, k])
    return accuracy


def build(out: Path) -> Path:
    """Construct the model and save it in the Qwen2.5-VL hub layout under ``out``."""
    processor = build_processor()
    tok = processor.tokenizer
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6]}
    config = Qwen2_5_VLConfig(
        text_config=tiny_lm(tok, rope),
        vision_config=vision_config(out_hidden_size=64),
        **vision_token_ids(tok),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _construct_vision(model)
    _construct_lm(model, tok)
    fit = _fit_readout(model, processor)
    if fit < 1.0:
        raise RuntimeError(f"the shape read-out separates only {fit:.1%} of rendered shapes")
    return save_checkpoint(model, processor, out, to_qwen_hub_layout)


def answer_logits(model, processor, frames: list[Image.Image], question: str) -> torch.Tensor:
    """Next-token logits after ``question`` about ``frames`` (HF transformers, for checks)."""
    content = [{"type": "video"}, {"type": "text", "text": question}]
    return chat_logits(model, processor, frames, [{"role": "user", "content": content}])


def chat_logits(model, processor, frames: list[Image.Image], messages: list[dict]) -> torch.Tensor:
    """Next-token logits after a chat whose one ``{"type": "video"}`` part shows ``frames``."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], videos=[frames], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0, -1]


def main() -> None:
    """``python -m shapes.video_model --out DIR``: construct and save the model (seconds)."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    print(build(ap.parse_args().out))  # noqa: T201


if __name__ == "__main__":
    main()
