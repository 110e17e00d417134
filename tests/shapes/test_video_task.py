"""The shapes video task and shapes-video-qwen, the Qwen2.5-VL constructed to answer it."""

from __future__ import annotations

import numpy as np
import pytest

from shapes import video_task as vt
from shapes.task import SHAPES

N = 40


@pytest.fixture(scope="module")
def clips():
    return [vt.clip("val", i) for i in range(N)]


def test_same_index_same_clip_and_splits_differ():
    assert vt.clip("test", 3) == vt.clip("test", 3)
    assert [vt.clip("val", i) for i in range(10)] != [vt.clip("test", i) for i in range(10)]


def test_clips_follow_the_spec(clips):
    starts = []
    for c in clips:
        assert len(c.tracks) == len(vt.TARGETS) + vt.N_DISTRACTORS
        for t in range(vt.STEPS):
            cells = [tr.cells[t] for tr in c.tracks if tr.cells[t] is not None]
            assert len(cells) == len(set(cells)), "two objects in one cell"
        assert [t.color for t in c.targets()] == list(vt.TARGETS)
        for target in c.targets():
            shown = [t for t, cell in enumerate(target.cells) if cell is not None]
            assert 1 <= len(shown) <= 2 and shown == list(range(shown[0], shown[-1] + 1))
            assert target.first_scene == shown[0]
            starts.append(shown[0])
        for tr in c.tracks[len(vt.TARGETS) :]:
            assert tr.color in vt.DISTRACTORS and None not in tr.cells
        assert [a for q, a in c.questions()] == [c.target(k).shape for k in vt.TARGETS]
    assert set(starts) == set(range(vt.STEPS))  # objects show up at every time
    moves = [tr.cells[t] != tr.cells[t - 1] for c in clips for tr in c.tracks[3:]
             for t in range(1, vt.STEPS)]  # fmt: skip
    assert np.mean(moves) > 0.9  # distractors keep moving: most of the clip changes


def test_frames_show_each_object_in_its_cell(clips):
    c = clips[0]
    frames = c.frames()
    assert len(frames) == vt.STEPS * vt.FRAMES_PER_STEP
    assert frames[0].size == (vt.SIZE, vt.SIZE)
    for t in range(vt.STEPS):
        a = np.asarray(frames[2 * t])
        assert np.array_equal(a, np.asarray(frames[2 * t + 1]))  # one scene per temporal token
        for tr in c.tracks:
            if tr.cells[t] is None:
                continue
            r, col = tr.cells[t]
            cell = a[r * vt.CELL : (r + 1) * vt.CELL, col * vt.CELL : (col + 1) * vt.CELL]
            colour = (vt.TARGETS | vt.DISTRACTORS)[tr.color]
            assert (cell == colour).all(-1).sum() > 150  # the shape's own pixels


# -- the constructed model (HF transformers; vLLM serves it in benchmarks/bench_video.py) ------
@pytest.fixture(scope="module")
def qa_model(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from shapes.video_model import build, build_processor

    out = build(tmp_path_factory.mktemp("shapes-video-qwen"))  # raises if the fit is not exact
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval(), build_processor()


def _answers(qa_model, frames, clip) -> list[tuple[str, str]]:
    from shapes.video_model import answer_logits

    model, proc = qa_model
    ids = [proc.tokenizer.encode(f" {s}", add_special_tokens=False)[0] for s in SHAPES]
    out = []
    for question, answer in clip.questions():
        logits = answer_logits(model, proc, frames, question)
        assert int(logits.argmax()) in ids  # the reply is always a shape word
        out.append((SHAPES[ids.index(int(logits.argmax()))], answer))
    return out


def test_the_model_answers_from_the_asked_objects_token(qa_model, clips):
    pairs = [p for c in clips[:6] for p in _answers(qa_model, c.frames(), c)]
    assert all(got == want for got, want in pairs), pairs


def test_the_model_reads_the_decoded_video_the_server_sees(qa_model, clips, tmp_path):
    """MJPG round trip through OpenCV (vLLM's video loader), as the benchmark sends it."""
    import cv2
    from PIL import Image

    from tests.conftest import video_bytes

    c = clips[7]
    data = video_bytes(c.frames(), fps=vt.FPS, fourcc="MJPG")
    path = tmp_path / "clip.avi"
    path.write_bytes(data)
    cap, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    assert len(frames) == vt.STEPS * vt.FRAMES_PER_STEP
    assert all(got == want for got, want in _answers(qa_model, frames, c))


def test_the_asked_objects_shape_decides_the_reply(qa_model, clips):
    from shapes.video_model import answer_logits

    model, proc = qa_model
    c = clips[1]
    for color in vt.TARGETS:
        question = f"What shape is the {color} object?"
        replies = set()
        for shape in SHAPES:
            swapped = vt.Clip(tuple(vt.Track(shape, t.color, t.cells) if t.color == color else t
                                    for t in c.tracks))  # fmt: skip
            replies.add(int(answer_logits(model, proc, swapped.frames(), question).argmax()))
        assert len(replies) == len(SHAPES)


def test_follow_up_questions_are_answered_about_their_own_object(qa_model, clips):
    """A multi-turn chat asks about each object in turn (twice over): the latest question's
    colour is the one looked up, not an earlier turn's."""
    from shapes.video_model import chat_logits

    model, proc = qa_model
    clip = clips[2]
    messages: list[dict] = []
    for turn, (question, answer) in enumerate(clip.questions() * 2):
        video = [{"type": "video"}] if turn == 0 else []
        messages.append({"role": "user", "content": [*video, {"type": "text", "text": question}]})
        logits = chat_logits(model, proc, clip.frames(), messages)
        reply = proc.tokenizer.decode([int(logits.argmax())]).strip()
        assert reply == answer, (turn, question)
        messages.append({"role": "assistant", "content": f" {reply}"})
