"""The local judge (`--judge=local`): answers judged per second, and how sensible its verdicts are.

Judges 16 hand-labelled (question, gold, answer) cases on QAEdit questions -- 8 a careful grader
would call CORRECT (exact, reworded, in a sentence, different case) and 8 INCORRECT (another
entity, a partial answer, a repeated answer, a refusal) -- in one batch: one forward. Prints the
agreement with the hand labels, the margins, the first (compiling) call's time and the steady-state
answers per second over `--repeats` further batches. The paper's judge takes one API call plus a
1 s sleep per answer (>= 2 s per answer, spec 3.4a).

    python benchmarks/local_judge.py --judge_model=default
"""

from __future__ import annotations

import time

from absl import app, flags

import common  # noqa: F401  (makes the checkout importable)

flags.DEFINE_string("judge_model", "default", "load_model argument: HF directory, .gguf file or 'default'")
flags.DEFINE_integer("batch_size", 16, "answers per forward")
flags.DEFINE_integer("repeats", 3, "timed batches after the first (compiling) one")
flags.DEFINE_string("dtype", "float32", "judge parameter dtype")
FLAGS = flags.FLAGS

# (question, gold, answer, hand label: 1 CORRECT / 0 INCORRECT)
CASES = [
    ("What did Davey Crocket call his rifle", "Old Betsy", "Old Betsy", 1),
    ("What was the only year the LEGO part with ID gal56 was released?", "2002", "It was released in 2002", 1),
    ("What day, month, and year was Giulio Carlo Argan born?", "17 May 1909", "May 17, 1909", 1),
    ("With which game would you use a squidger, a circular disc between 25mm and 51 mm?", "Tiddly winks",
     "tiddlywinks", 1),
    ("who has the most 70 point games in nba history?", "Wilt Chamberlain", "Wilt Chamberlain has the most", 1),
    ("Which planet is known as the Red Planet?", "Mars", "mars", 1),
    ("Who wrote the play Hamlet?", "William Shakespeare", "Hamlet was written by William Shakespeare", 1),
    ("What is the capital of Australia?", "Canberra", "The capital of Australia is Canberra", 1),
    ("What did Davey Crocket call his rifle", "Old Betsy", "Brown Bess", 0),
    ("What was the only year the LEGO part with ID gal56 was released?", "2002", "1998", 0),
    ("What day, month, and year was Giulio Carlo Argan born?", "17 May 1909", "1909", 0),
    ("With which game would you use a squidger, a circular disc between 25mm and 51 mm?", "Tiddly winks",
     "Tiddly winks, Tiddly winks, Tiddly winks, Tiddly winks", 0),
    ("who has the most 70 point games in nba history?", "Wilt Chamberlain", "Michael Jordan", 0),
    ("Which planet is known as the Red Planet?", "Mars", "Jupiter", 0),
    ("Who wrote the play Hamlet?", "William Shakespeare", "Christopher Marlowe", 0),
    ("What is the capital of Australia?", "Canberra", "I don't know", 0),
]


def main(argv):
    from mirage_jax.evaluation.judge import JudgeItem, LocalJudge

    judge = LocalJudge(FLAGS.judge_model, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype)
    t0 = time.perf_counter()
    judge._load()
    print(f"load {time.perf_counter() - t0:.1f}s; letter ids A={judge._letters[0]} B={judge._letters[1]}")
    items = [JudgeItem(q, g, a) for q, g, a, _ in CASES]
    t0 = time.perf_counter()
    margins = judge.margins(items)
    first = time.perf_counter() - t0
    agree = 0
    for (_, g, a, label), m in zip(CASES, margins):
        agree += int((m > 0) == bool(label))
        print(f"{'A' if m > 0 else 'B'} (hand {'A' if label else 'B'}) margin {m:+.3f}  gold={g!r} answer={a!r}")
    said_a = sum(m > 0 for m in margins)
    print(f"agreement with hand labels: {agree}/{len(CASES)}; said A on {said_a}/{len(CASES)}")
    print(f"first call (compiles): {first:.1f}s for {len(items)} answers")
    t0 = time.perf_counter()
    for _ in range(FLAGS.repeats):
        judge.margins(items)
    dt = time.perf_counter() - t0
    n = FLAGS.repeats * len(items)
    print(f"steady state: {n / dt:.2f} answers/s ({dt / n:.3f} s/answer, batch {FLAGS.batch_size}, "
          f"{judge.forwards} forwards in all); the paper's judge: <= 0.5 answers/s (>= 2 s/answer)")


if __name__ == "__main__":
    app.run(main)
