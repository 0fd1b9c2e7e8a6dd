"""Look at prompts before spending GPU hours: ``python -m syntagen_st.prompts``.

``--source llm --classes dog,sofa --n 20`` asks the configured language model for 20 captions
of that combination and prints the accepted ones and the reasons for every rejection; without
``--classes`` the combinations are drawn as in round 0. ``--out FILE`` writes the accepted
prompts as a file that ``generate.prompts_file`` reads (JSONL when FILE ends in .jsonl, else
plain lines).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.classes import canonical
from ..core.cli import config_from, config_parser, run_main
from ..core.errors import UserError
from ..core.store import atomic_write_text
from .captions import NearDuplicates, Verdict
from .records import load_prompt_file, phrase_caption
from .rounds import llm_records, new_records

PROG = "syntagen_st.prompts"


def _combination_prompts(
    cfg, classes: tuple[str, ...], n: int, rejections: list[Verdict]
) -> tuple[list[tuple[str, tuple[str, ...]]], dict | None]:
    """``n`` prompts of exactly ``classes`` from the configured source."""
    gen = cfg.generate
    if gen.prompt_source == "llm":
        from .llm import open_writer

        allowed = {canonical(c) for c in gen.classes} | set(classes)
        with open_writer(cfg) as writer:
            got, stats = writer.write({classes: n}, allowed, f"{cfg.seed}:prompts:cli", NearDuplicates(), rejections)
        return [(v.caption, v.classes) for v in got[classes]], stats.to_dict()
    if gen.prompt_source == "file":
        lines = [(p, c) for p, c in load_prompt_file(gen.prompts_file) if set(classes) <= set(c)]
        return lines[:n], None
    rng = np.random.default_rng(cfg.seed)
    return [(phrase_caption(rng, classes), classes) for _ in range(n)], None


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(f"python -m {PROG}", "Print the prompts a source writes, and why any were rejected.",
                           sections=("model", "generate"))
    parser.add_argument("--source", choices=["templates", "file", "llm"], help="shortcut for --generate.prompt_source")
    parser.add_argument("--classes", help="one combination, comma-separated (dog,sofa); default: drawn as in round 0")
    parser.add_argument("--n", type=int, default=20, help="how many prompts")
    parser.add_argument("--out", help="write the accepted prompts to FILE (.jsonl or plain lines)")
    ns = parser.parse_args(argv)
    if ns.source is not None:
        ns.generate.prompt_source = ns.source
    if ns.n < 1:
        raise UserError(f"--n must be >= 1, got {ns.n}")
    cfg = config_from(parser, ns)
    if cfg.generate.prompt_source == "llm":
        from .llm import check_llm  # torch and transformers: only once the flags are good

        check_llm(cfg)  # seconds, not minutes of download retries
    rejections: list[Verdict] = []
    if ns.classes:
        try:
            classes = tuple(dict.fromkeys(canonical(c) for c in ns.classes.split(",") if c.strip()))
        except ValueError as err:
            raise UserError(f"--classes: {err}") from None
        if not classes:
            raise UserError("--classes names no class")
        prompts, stats = _combination_prompts(cfg, classes, ns.n, rejections)
    else:
        if cfg.generate.prompt_source == "llm":
            records, stats = llm_records(cfg, 0, range(ns.n), None, rejections=rejections)
        else:
            records, stats = new_records(cfg, 0, range(ns.n), None)
        prompts = [(r.prompt, r.classes) for r in records]  # LLM top-ups included: stats counts them
    for prompt, named in prompts:
        print(f"{prompt}    [{', '.join(named)}]")
    if rejections:
        print(f"\nrejected {len(rejections)}:")
        for verdict in rejections:
            print(f"  {verdict.reason}: {verdict.caption[:120]}")
    if stats is not None:
        print(f"\n{json.dumps(stats)}")
    if ns.out:
        out = Path(ns.out)
        if out.suffix == ".jsonl":
            text = "".join(json.dumps({"prompt": p, "classes": list(c)}) + "\n" for p, c in prompts)
        else:
            text = "".join(p + "\n" for p, _ in prompts)
        if not prompts:
            raise UserError(f"no prompt was accepted; {out} not written")
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
        print(f"{len(prompts)} prompts written to {out}")
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
