"""evaluate_segmentation.py on hostile input: mask files that are no masks, one word with two masks,
damaged runs among good ones, sets of which nothing can be scored, a byte-order mark in --classes,
and the output folder's leftovers."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from test_segmentation import PIXELS, REGION, SIDE, box_mask, make_run, read_csv, run_main, summary, voc_png
from synthetic_dump import write_runs

from attention_map_diffusers.segmentation import masks as gtmod

PROMPT = "a red cat on a sofa"


def skips(out):
    return {(r["key"], r["name"]): r["reason"] for r in read_csv(out / "skipped.csv")}


def test_entries_that_are_no_mask_files_are_listed_with_the_reason(tmp_path, capsys):
    make_run(tmp_path / "r", PROMPT, [("cat", REGION[0], REGION[1])])
    m = tmp_path / "m" / "r"
    box_mask(str(m / "cat.png"))
    box_mask(str(m / "sofa.jpg"))  # saved as JPEG
    os.makedirs(m / "red.png")  # a folder with a mask's name
    os.symlink("loop.png", m / "loop.png")  # a link to itself
    os.symlink(str(tmp_path / "gone.png"), m / "on.png")  # a broken link
    (m / ".DS_Store").write_bytes(b"\0")  # hidden: not ours to list
    code, _, err = run_main(["--dumps", tmp_path / "r", "--masks", tmp_path / "m", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    got = skips(tmp_path / "o")
    assert set(got) == {("r", "sofa.jpg"), ("r", "red.png"), ("r", "loop.png"), ("r", "on.png")}
    assert got[("r", "sofa.jpg")].startswith("not a .png file") and "JPEG" in got[("r", "sofa.jpg")]
    assert got[("r", "red.png")] == "a folder, not a mask file"
    assert "link that leads nowhere" in got[("r", "loop.png")] and "link that leads nowhere" in got[("r", "on.png")]
    assert {r["word"] for r in read_csv(tmp_path / "o" / "per_image" / "r.csv")} == {"cat"}  # the mask there is scored


def test_voc_mask_saved_as_jpeg_or_a_folder_is_listed(tmp_path, capsys):
    for key in ("a", "b", "c"):
        make_run(tmp_path / "runs" / key, "a cat on a sofa", [("cat", REGION[0], REGION[1])])
    labels = np.zeros((SIDE, SIDE), np.uint8)
    labels[PIXELS] = 8  # cat
    voc_png(str(tmp_path / "voc" / "a.png"), labels)
    Image.fromarray(labels).save(tmp_path / "voc" / "b.JPG")  # JPEG changes labels: not read
    os.makedirs(tmp_path / "voc" / "c.png")
    code, _, err = run_main(["--dumps", tmp_path / "runs", "--masks", tmp_path / "voc", "--voc", "--out", tmp_path / "o"],
                            capsys)
    assert code == 0, err
    got = skips(tmp_path / "o")
    assert got[("b", "")] == "b.JPG is not a .png file (--voc masks are class-index PNGs)"
    assert got[("c", "")] == "c.png: a folder, not a mask file"
    assert int(summary(tmp_path / "o")[("daam", "both")]["images"]) == 1


def test_one_word_with_two_masks_is_not_scored_twice(tmp_path, capsys):
    make_run(tmp_path / "r", PROMPT, [("cat", REGION[0], REGION[1])])
    for name in ("red.png", "Red.png", "cat.png"):
        box_mask(str(tmp_path / "m" / "r" / name))
    code, _, err = run_main(["--dumps", tmp_path / "r", "--masks", tmp_path / "m", "--out", tmp_path / "o",
                             "--methods", "daam", "--encoder", "t5"], capsys)
    assert code == 0, err
    rows = read_csv(tmp_path / "o" / "per_image" / "r.csv")
    assert [r["word"] for r in rows] == ["cat"]
    got = skips(tmp_path / "o")
    assert set(got) == {("r", "Red.png"), ("r", "red.png")}
    assert got[("r", "red.png")] == "2 masks for one word of the prompt (Red.png, red.png; names match case-insensitively): keep one"
    assert int(summary(tmp_path / "o")[("daam", "t5")]["n"]) == 1


def _three_runs(tmp_path, damage):
    runs = []
    for r in range(3):
        folder = f"{r:04d}-run"
        make_run(tmp_path / "d" / folder, PROMPT, [("cat", REGION[0], REGION[1])], seed=r)
        box_mask(str(tmp_path / "m" / folder / "cat.png"))
        runs.append({"run": r, "folder": folder, "prompt": [PROMPT], "seed": r, "status": "done"})
    write_runs(tmp_path / "d", runs)
    damage(tmp_path / "d" / "0001-run", tmp_path / "m" / "0001-run")


@pytest.mark.parametrize("what", ["npz", "metadata", "mask size", "mask unreadable"])
def test_a_damaged_run_is_listed_and_the_others_are_scored(tmp_path, capsys, what):
    def damage(run, masks):
        if what == "npz":
            (run / "stepavg_token_maps_v1.npz").write_bytes(b"PK\x03\x04 not a zip")
        elif what == "metadata":
            (run / "metadata.json").write_text('{"prompt": ["a red cat on a sofa"], "image_size": "big"}')
        elif what == "mask size":
            box_mask(str(masks / "cat.png"), shape=(32, 32), pixels=(slice(0, 8), slice(0, 8)))
        else:
            (masks / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    _three_runs(tmp_path, damage)
    out = tmp_path / "o"
    code, stdout, err = run_main(["--dumps", tmp_path / "d", "--masks", tmp_path / "m", "--out", out], capsys)
    assert code == 1, err
    row = summary(out)[("daam", "both")]
    assert (int(row["images"]), int(row["n"])) == (2, 2)
    assert sorted(os.listdir(out / "per_image")) == ["0000-run.csv", "0002-run.csv"]
    got = skips(out)
    assert list(got) == [("0001-run", "")] and got[("0001-run", "")].startswith("not scored: ")
    lines = err.strip().splitlines()
    assert lines[-2].startswith("evaluate_segmentation.py: error: 0001-run: not scored: ")
    assert lines[-1] == ("evaluate_segmentation.py: error: 1 of 3 runs could not be scored (listed in skipped.csv); "
                         "the others are")
    assert "wrote " in stdout


def test_every_run_damaged_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    def damage(run, masks):
        pass

    _three_runs(tmp_path, damage)
    for r in range(3):
        (tmp_path / "d" / f"{r:04d}-run" / "stepavg_token_maps_v1.npz").write_bytes(b"junk")
    code, _, err = run_main(["--dumps", tmp_path / "d", "--masks", tmp_path / "m", "--out", tmp_path / "o"], capsys)
    assert code == 2 and not (tmp_path / "o").exists()
    assert err.strip().splitlines()[-1].startswith("evaluate_segmentation.py: error: none of the 3 runs could be scored; "
                                                   "the first: ")


def test_nothing_to_score_warns_and_exits_1(tmp_path, capsys):
    """All masks empty (per word) or all void (VOC): the files say why, and the exit code is 1."""
    make_run(tmp_path / "r", PROMPT, [("cat", REGION[0], REGION[1])])
    for word in ("cat", "sofa"):
        box_mask(str(tmp_path / "m" / "r" / f"{word}.png"), value=0)
    code, stdout, err = run_main(["--dumps", tmp_path / "r", "--masks", tmp_path / "m", "--out", tmp_path / "o"], capsys)
    assert code == 1
    assert err.strip().splitlines() == [
        "evaluate_segmentation.py: warning: nothing could be scored: no (image, word) pair has a usable mask "
        "(2 skipped, see skipped.csv); the summary is empty"]
    assert read_csv(tmp_path / "o" / "summary.csv") == []
    assert skips(tmp_path / "o") == {("r", "cat"): "empty mask (no nonzero pixel)", ("r", "sofa"): "empty mask (no nonzero pixel)"}
    voc_png(str(tmp_path / "voc" / "r.png"), np.full((SIDE, SIDE), 255, np.uint8))
    code, _, err = run_main(["--dumps", tmp_path / "r", "--masks", tmp_path / "voc", "--voc", "--out", tmp_path / "o2"],
                            capsys)
    assert code == 1 and "nothing could be scored" in err
    assert skips(tmp_path / "o2") == {("r", ""): "every pixel of the mask is void (255): nothing to score"}
    assert (tmp_path / "o2" / "summary.png").is_file() and (tmp_path / "o2" / "cases.png").is_file()


def test_byte_order_mark_in_classes_is_no_part_of_a_name(tmp_path, capsys):
    (tmp_path / "classes.txt").write_bytes("background\ncat\nsofa\n".encode("utf-8-sig"))
    assert [c.name for c in gtmod.read_classes(str(tmp_path / "classes.txt"))] == ["background", "cat", "sofa"]
    make_run(tmp_path / "runs" / "a", "a cat on a mat", [("cat", REGION[0], REGION[1])])
    labels = np.zeros((SIDE, SIDE), np.uint8)
    labels[PIXELS] = 1
    voc_png(str(tmp_path / "voc" / "a.png"), labels)
    code, _, err = run_main(["--dumps", tmp_path / "runs", "--masks", tmp_path / "voc", "--voc", "--classes",
                             tmp_path / "classes.txt", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert skips(tmp_path / "o") == {}  # background is never a concept, so never "not in the prompt"
    assert {r["word"] for r in read_csv(tmp_path / "o" / "per_image" / "a.csv")} == {"cat"}


# ---------------------------------------------------------------------------------------------
# the output folder


def _one_run(tmp_path):
    make_run(tmp_path / "r", PROMPT, [("cat", REGION[0], REGION[1])])
    box_mask(str(tmp_path / "m" / "r" / "cat.png"))
    return ["--dumps", tmp_path / "r", "--masks", tmp_path / "m", "--out", tmp_path / "o"]


def _manifest(folder, files):
    import json

    from attention_map_diffusers.segmentation.write import GENERATOR, MANIFEST

    (folder / MANIFEST).write_text(json.dumps({"generator": GENERATOR, "files": files}))


def test_leftovers_are_removed_only_when_every_file_is_on_their_manifest(tmp_path, capsys):
    from attention_map_diffusers.atomic import TEMP_MARK
    from attention_map_diffusers.segmentation.write import new_folder, write_all

    args = _one_run(tmp_path)
    # a kill while writing: the files written so far are listed, one rename was under way
    killed = new_folder(str(tmp_path / "o"))
    write_all(killed, {"summary.csv": "x\n", "per_image/r.csv": "y\n"})
    (tmp_path / killed / "per_image" / f".r.{TEMP_MARK}k2j4h5l1.tmp.csv").write_text("half")  # atomic_path's name
    # an earlier evaluation being replaced when the kill came, and the user's notes put in it since
    old = tmp_path / ".o.old-abc123"
    (old / "per_image").mkdir(parents=True)
    (old / "summary.csv").write_text("x\n")
    (old / "per_image" / "r.csv").write_text("y\n")
    _manifest(old, ["summary.csv", "per_image/r.csv"])
    (old / "notes.txt").write_text("mine")
    # a folder of the same pattern that this tool never marked: not ours to judge
    (tmp_path / ".o.tmp-zzz").mkdir()
    (tmp_path / ".o.tmp-zzz" / "summary.csv").write_text("theirs")
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    assert not os.path.exists(killed)
    assert (old / "notes.txt").read_text() == "mine" and (old / "summary.csv").is_file()
    assert (tmp_path / ".o.tmp-zzz" / "summary.csv").read_text() == "theirs"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"evaluate_segmentation.py: warning: left {old} alone: it holds notes.txt,")
    # a file in a folder that the manifest does not list, and a sub-folder of its own, count as the user's
    (old / "notes.txt").unlink()
    (old / "per_image" / "mine.csv").write_text("z")
    code, _, err = run_main(args, capsys)
    assert code == 0 and "it holds per_image/mine.csv," in err and old.exists()
    (old / "per_image" / "mine.csv").unlink()
    (old / "plots").mkdir()
    code, _, err = run_main(args, capsys)
    assert code == 0 and "it holds plots/," in err and old.exists()
    (old / "plots").rmdir()
    code, _, err = run_main(args, capsys)
    assert code == 0 and err == "" and not old.exists()


def test_an_earlier_evaluation_with_a_file_of_the_user_is_not_replaced_as_a_whole(tmp_path, capsys):
    args = _one_run(tmp_path)
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    out = tmp_path / "o"
    (out / "notes.txt").write_text("mine")
    (out / "per_image" / "stale.csv").write_text("from an earlier evaluation")
    manifest = out / ".segmentation-manifest.json"
    import json

    listed = json.loads(manifest.read_text())
    listed["files"].append("per_image/stale.csv")
    manifest.write_text(json.dumps(listed))
    code, _, err = run_main(args, capsys)
    assert code == 2 and "holds an earlier evaluation and notes.txt, which this tool did not write" in err
    assert (out / "notes.txt").read_text() == "mine"
    code, _, err = run_main([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"  # kept
    assert not (out / "per_image" / "stale.csv").exists()  # the earlier evaluation's, not written again
    assert sorted(os.listdir(out / "per_image")) == ["r.csv"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".o.")]


def test_runs_the_dump_failed_or_lost_are_listed(tmp_path, capsys):
    def damage(run, masks):
        import shutil

        shutil.rmtree(run)  # runs.jsonl says done, the folder is gone

    _three_runs(tmp_path, damage)
    with open(tmp_path / "d" / "runs.jsonl", "a") as fh:
        fh.write('{"run": 3, "folder": "0003-run", "prompt": ["x"], "seed": 3, "status": "failed", "error": "CUDA OOM"}\n')
    code, _, err = run_main(["--dumps", tmp_path / "d", "--masks", tmp_path / "m", "--out", tmp_path / "o"], capsys)
    assert code == 1, err
    got = skips(tmp_path / "o")
    assert got[("0003-run", "")] == "run failed in the dump (CUDA OOM)"
    assert got[("0001-run", "")].startswith("not scored: ") and "0001-run" in got[("0001-run", "")]
    lines = err.strip().splitlines()
    assert sum("0001-run" in ln for ln in lines) == 1  # said once
    assert lines[-1].startswith("evaluate_segmentation.py: error: 1 of 4 runs could not be scored")
    assert int(summary(tmp_path / "o")[("daam", "both")]["images"]) == 2
