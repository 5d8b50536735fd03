"""The demo's dataset: English speech synthesized with espeak-ng, as NeMo-style manifests.

Utterances are digit strings ("four seven two") and short sentences from a small vocabulary,
spoken by many espeak-ng voices (accents x voice variants) at random rates and pitches. Two
tasks: ``asr`` (transcribe) and ``qa`` (a question about the spoken numbers: the first, the last,
or how many). The test split is spoken only by voices never heard in training: held-out variants
of the training accents and two held-out accents; validation uses other held-out variants.
Every row keeps its ``transcript`` (what is spoken), the target of the encoder's CTC loss.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

TRAIN_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan")
HELD_OUT_ACCENTS = ("en-gb-x-gbcwmd", "en-us-nyc")
TRAIN_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3")

# split: (voices, utterances)
SPLITS = {
    "train": ([(a, v) for a in TRAIN_ACCENTS for v in TRAIN_VARIANTS], 9000),
    "valid": ([(a, v) for a in TRAIN_ACCENTS for v in ("m6", "f4")], 240),
    "test": (
        [(a, v) for a in TRAIN_ACCENTS for v in ("m7", "f5")]
        + [(a, v) for a in HELD_OUT_ACCENTS for v in ("", "m2", "f2")],
        600,
    ),
}

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COUNTS = {2: "two", 3: "three", 4: "four", 5: "five"}
QUESTIONS = {
    "What is the first number?": lambda digits: digits[0],
    "What is the last number?": lambda digits: digits[-1],
    "How many numbers are there?": lambda digits: COUNTS[len(digits)],
}
SUBJECTS = ("the cat", "the dog", "my friend", "the teacher", "a bird", "the farmer", "my sister")
VERBS = ("sees", "likes", "finds", "wants", "takes", "brings", "paints")
ADJECTIVES = ("red", "green", "small", "big", "old", "new", "blue")
OBJECTS = ("book", "ball", "apple", "car", "hat", "box", "chair")
ENDINGS = ("in the house", "on the table", "near the river", "at the park", "today",
           "every morning", "at night")  # fmt: skip


@dataclass
class Utterance:
    text: str  # what is spoken
    task: str
    question: str | None
    answer: str


def utterance(rng: random.Random, qa_share: float = 0.75) -> Utterance:
    """60% digit strings (most of them asked about), 40% sentences (transcribed)."""
    if rng.random() < 0.6:
        digits = [rng.choice(DIGITS) for _ in range(rng.randint(2, 5))]
        text = " ".join(digits)
        if rng.random() < qa_share:
            question = rng.choice(list(QUESTIONS))
            return Utterance(text, "qa", question, QUESTIONS[question](digits))
        return Utterance(text, "asr", None, text)
    text = (f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} "
            f"{rng.choice(OBJECTS)} {rng.choice(ENDINGS)}")  # fmt: skip
    return Utterance(text, "asr", None, text)


def all_words() -> list[str]:
    """Every text a demo prompt or answer holds (the tokenizer's training text)."""
    lines = [" ".join(DIGITS), *QUESTIONS, "Transcribe the audio.", "Q: A:"]
    lines += [" ".join(group) for group in (SUBJECTS, VERBS, ADJECTIVES, OBJECTS, ENDINGS)]
    return lines


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _speak(job: tuple[str, str, int, int, Path]) -> None:
    text, voice, rate, pitch, path = job
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(path), text],
        check=True, capture_output=True,
    )  # fmt: skip


def synthesize(
    folder: Path, seed: int = 0, workers: int = 2, scale: float = 1.0, log=print
) -> dict:
    """Write ``folder/<split>/NNNNNN.wav`` and ``folder/<split>.jsonl`` for every split (skipped
    when ``folder/done.json`` says it was finished with the same settings). ``scale`` multiplies
    the utterance counts (tests use a few)."""
    settings = {"seed": seed, "scale": scale, "splits": {k: v[1] for k, v in SPLITS.items()}}
    done = folder / "done.json"
    if done.is_file() and json.loads(done.read_text()) == settings:
        log(f"dataset: reusing {folder}")
        return settings
    rng = random.Random(seed)
    jobs, manifests = [], {}
    for split, (voices, count) in SPLITS.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(max(1, round(count * scale))):
            u = utterance(rng)
            accent, variant = rng.choice(voices)
            voice = f"{accent}+{variant}" if variant else accent
            path = folder / split / f"{i:06d}.wav"
            jobs.append((u.text, voice, rng.randint(130, 200), rng.randint(30, 70), path))
            row = {"audio_filepath": f"{split}/{path.name}", "answer": u.answer, "task": u.task,
                   "transcript": u.text, "voice": voice}  # fmt: skip
            if u.question:
                row["question"] = u.question
            rows.append(row)
        manifests[split] = rows
    log(f"dataset: speaking {len(jobs)} utterances with espeak-ng ({workers} processes)")
    with ThreadPoolExecutor(workers) as pool:
        for n, _ in enumerate(pool.map(_speak, jobs), start=1):
            if n % 1000 == 0 or n == len(jobs):
                log(f"dataset: {n}/{len(jobs)} utterances")
    for split, rows in manifests.items():
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    done.write_text(json.dumps(settings))
    return settings
