"""Does a fed hidden state act like an input? A first look at the alignments of
selar_local/alignment.py (docs/LATENT.md), before any method runs on them.

For positions t of a text, the model's hidden state h_t (the state that predicts token t+1)
is fed back at position t+1 through each alignment, and the logits that follow are compared
with those that follow the model's own most likely token at t (argmax of step t's logits),
fed as a token: how often the two agree on the top token, and KL(token path || fed vector)
in nats. Also two references: the expected input row under step t's top-20 distribution
(Soft Thinking's input) and a random token's row (what "unrelated" looks like).

    nice -n 10 python benchmarks/latent_alignment_quality.py [--model qwen2.5-coder-0.5b-instruct ...] [--positions 40]

Asserts nothing; prints one table row per model and input.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May? In April she sold 48 clips. In May she "
        "sold half as many, which is 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips in April and May.")


def log_softmax(x):
    import numpy as np

    x = x.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def measure(name: str, positions: int, seed: int) -> dict[str, tuple[float, float]]:
    import numpy as np

    from selar_local.alignment import load_alignment
    from selar_local.embeddings import EmbeddingTable, input_scale_for
    from selar_local.engine import LlamaContext, LlamaModel
    from selar_local.registry import resolve_model

    path = resolve_model(name)
    model = LlamaModel(path)
    ctx = LlamaContext(model, n_ctx=256, n_batch=256, n_seq_max=2, n_threads=1, n_threads_batch=1)
    table = EmbeddingTable(path, scale=input_scale_for(model.architecture, model.n_embd_inp))
    alignments = {kind: load_alignment(path, kind, n_hidden=model.n_embd, progress=True)
                  for kind in ("ridge", "identity")}
    rng = np.random.default_rng(seed)
    try:
        tokens = model.tokenize(TEXT)[:200]
        n = len(tokens)
        ctx.set_hidden_output(True)
        ctx.decode_tokens(tokens, range(n), [0] * n, [True] * n)
        hidden = ctx.hidden_rows(n).copy()
        logits = ctx.logits_rows(n).copy()
        ctx.set_hidden_output(False)
        chosen = np.linspace(8, n - 2, min(positions, n - 9)).astype(int)
        results: dict[str, list[tuple[bool, float]]] = {}
        for t in chosen:
            top = np.argsort(-logits[t])[:20]
            p = np.exp(log_softmax(logits[t][top]))
            inputs = {
                "token (argmax)": table.rows([int(top[0])])[0],
                "ridge W_a": alignments["ridge"].apply(hidden[t]),
                "identity": alignments["identity"].apply(hidden[t]),
                "top-20 expected row": (p.astype(np.float32) @ table.rows(top.tolist())),
                "random token": table.rows([int(rng.integers(model.n_vocab))])[0],
            }
            outputs = {}
            for label, row in inputs.items():
                ctx.copy_sequence(0, 1, keep=t + 1)
                ctx.decode_embeddings(row[None, :].astype(np.float32), [t + 1], [1], [True])
                outputs[label] = log_softmax(ctx.logits(0))
            reference = outputs["token (argmax)"]
            for label, out in outputs.items():
                kl = float((np.exp(reference) * (reference - out)).sum())
                results.setdefault(label, []).append((out.argmax() == reference.argmax(), kl))
        return {label: (100 * np.mean([a for a, _ in v]), float(np.median([k for _, k in v])))
                for label, v in results.items()} | {"positions": (len(chosen), 0.0)}
    finally:
        table.close()
        ctx.close()
        model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append")
    parser.add_argument("--positions", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", help="cache folder (default: the usual one, where the alignment is kept)")
    args = parser.parse_args()
    if args.cache:
        os.environ["SELAR_CACHE_DIR"] = args.cache
    models = args.model or ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
    print("| model | input fed at t+1 | top-1 agrees with the token path | median KL(token path || it), nats |")
    print("|---|---|---|---|")
    for name in models:
        r = measure(name, args.positions, args.seed)
        count = r.pop("positions")[0]
        for label, (agree, kl) in r.items():
            if label != "token (argmax)":
                print(f"| {name} ({count} positions) | {label} | {agree:.0f}% | {kl:.2f} |")


if __name__ == "__main__":
    main()
