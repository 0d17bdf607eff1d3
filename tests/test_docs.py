"""The README is short and its commands work; the docs site builds strictly and stays inside the repository."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_is_short_and_links_only_inside_the_repository():
    assert len(README.splitlines()) <= 250
    assert "DESIGN.md" not in README  # not in the repository
    for target in LINK.findall(README):
        assert not target.startswith(("http:", "https:", "/")), target
        assert (ROOT / target.split("#")[0]).is_file(), target


def test_the_readme_two_commands_are_the_makefile_targets():
    commands = [line.split("#")[0].strip() for line in _blocks(_section("Two commands"), "bash")[0].splitlines()]
    assert commands == ["make demo", "make test"]
    for target, runs in (("demo", "fedilora fit --config configs/demo.yaml"), ("test", "-m pytest -q")):
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True)
        assert runs in dry.stdout, dry.stdout  # what the README says the command does


def test_docs_link_nothing_outside_the_repository():
    pages = sorted((ROOT / "docs").rglob("*.md"))
    assert len(pages) >= 15
    for page in pages:
        text = page.read_text()
        assert "DESIGN.md" not in text, page
        for target in LINK.findall(text):
            assert not target.startswith(("http:", "https:", "/")), (page, target)


NO_MKDOCS = "mkdocs is not installed (pip install -e '.[docs]'; make test installs it)"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason=NO_MKDOCS)
def test_docs_build_strictly(tmp_path):
    # --strict: a broken link or anchor, or a page left out of the nav, fails the build (mkdocs.yml: validation)
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "guide" / "bad-input.html").is_file()


def _my_data(folder: Path) -> None:
    """The README's own-data layout: my_data/train.csv with images/ beside it, 3 colours x 10 squares."""
    colours = {"car": (220, 30, 30), "boat": (30, 60, 220), "tree": (30, 200, 60)}
    (folder / "my_data" / "images").mkdir(parents=True)
    lines = ["image,text,label"]
    for k in range(30):
        label = list(colours)[k % 3]
        Image.new("RGB", (16, 16), colours[label]).save(folder / "my_data" / "images" / f"{k:04d}.png")
        lines.append(f"images/{k:04d}.png,a photo of a {label} number {k},{label}")
    (folder / "my_data" / "train.csv").write_text("\n".join(lines) + "\n")


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.slow
def test_the_python_quickstart_runs(tmp_path):
    (code,) = _blocks(_section("Python quickstart"), "python")
    _my_data(tmp_path)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    label, probability = done.stdout.strip().splitlines()[-1].split()
    assert label in {"car", "boat", "tree"} and 0 < float(probability) <= 1
    assert (tmp_path / "my_model" / "global" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_own_data_in_three_commands(tmp_path):
    (commands,) = _blocks(_section("Your own data in three commands"), "bash")
    _my_data(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the commands run from the checkout
    lines = [line.replace(".venv/bin/", "") for line in commands.strip().splitlines()]
    assert [line.split()[1] for line in lines] == ["fit", "export", "predict"]
    for line in lines:
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (line, done.stderr[-3000:])
    assert re.fullmatch(r'my_data/images/0000\.png \+ "a photo of a red car" -> (car|boat|tree) \(\d\.\d{4}\)\n',
                        done.stdout), done.stdout  # fmt: skip


def _render_results():
    """experiments/render_results.py, which renders the result tables of the docs from the benchmarks' JSON."""
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "experiments" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_pages_are_rendered_from_the_kept_json():
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "render_results.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr  # rendering would change nothing
    shown = {name for page in (ROOT / "docs").rglob("*.md") for name in re.findall(r"<!-- results:([\w.-]+) -->",
                                                                                       page.read_text())}  # fmt: skip
    kept = subprocess.run(["git", "ls-files", "experiments/results"], cwd=ROOT, capture_output=True, text=True)
    if kept.returncode != 0:
        pytest.skip("not a git checkout: which results JSON is kept is unknown")
    kept_names = {Path(line).stem for line in kept.stdout.split()}
    assert kept_names >= {"bench_overhead_threads1", "privacy_audit"}
    assert not any("_quick" in name for name in kept_names)  # smoke tests stay out of the repository
    assert kept_names <= shown, kept_names - shown  # every kept result is on a page


def test_a_changed_result_changes_its_page(tmp_path):
    render = _render_results()
    for source in (ROOT / "experiments" / "results").glob("*.json"):
        (tmp_path / source.name).write_text(source.read_text())
    page = (ROOT / "docs" / "results" / "benchmarks.md").read_text()
    assert render.render_page(page, tmp_path) == page
    data = json.loads((tmp_path / "bench_overhead_threads1.json").read_text())
    assert "| 9.876 |" not in page
    data.update(ratio=9.876, met=False)
    data["machine"]["date"] = "2031-02-03T04:05:06"
    (tmp_path / "bench_overhead_threads1.json").write_text(json.dumps(data))
    changed = render.render_page(page, tmp_path)
    block = re.search(r"<!-- results:bench_overhead_threads1 -->\n(.*?)<!-- /results:", changed, flags=re.S)[1]
    assert "| 9.876 | ≤ 1.1 | **no** |" in block and "Measured 2031-02-03 04:05" in block
    old_block = re.search(r"<!-- results:bench_overhead_threads1 -->\n(.*?)<!-- /results:", page, flags=re.S)[1]
    assert changed.replace(block, old_block) == page  # the rest of the page is its own


def test_results_blocks_that_cannot_be_rendered_are_one_line_errors(tmp_path):
    render = _render_results()
    (tmp_path / "bench_overhead_threads1.json").write_text('{"ratio": 1.0}')  # a results file of another shape
    cases = {
        "<!-- results:bench_overhead_quick -->\n<!-- /results:bench_overhead_quick -->": "is a quick run",
        "<!-- results:bench_overhead -->\n<!-- /results:bench_overhead -->": "bench_overhead.json does not exist",
        "<!-- results:bench_nothing -->\n<!-- /results:bench_nothing -->": "no renderer for benchmark 'bench_nothing'",
        "<!-- results:bench_overhead_threads1 -->\n<!-- /results:bench_overhead_threads1 -->": "does not hold",
        "<!-- results:privacy_audit -->\ntext\n": "has no matching",
        "<!-- results:privacy_audit -->\n<!-- /results:bench_secagg -->": "has no matching",
    }
    for text, message in cases.items():
        with pytest.raises(render.RenderError) as error:
            render.render_page(text, tmp_path, page="p.md")
        assert message in str(error.value) and str(error.value).startswith("p.md: ") and "\n" not in str(error.value)


def test_render_results_writes_stale_pages_and_check_only_reports_them(tmp_path, monkeypatch, capsys):
    render = _render_results()
    (tmp_path / "results").mkdir()
    source = ROOT / "experiments" / "results" / "privacy_audit.json"
    (tmp_path / "results" / "privacy_audit.json").write_text(source.read_text())
    page = tmp_path / "docs" / "audit.md"
    page.parent.mkdir()
    stale = "# Audit\n\n<!-- results:privacy_audit -->\nold figures\n<!-- /results:privacy_audit -->\n\nAfter.\n"
    page.write_text(stale)
    monkeypatch.setattr(render, "DOCS", tmp_path / "docs")
    monkeypatch.setattr(render, "RESULTS", tmp_path / "results")
    assert render.main(["--check"]) == 1 and page.read_text() == stale  # --check writes nothing
    assert "docs/audit.md: out of date" in capsys.readouterr().out
    assert render.main([]) == 0
    text = page.read_text()
    assert "old figures" not in text and "| 2.17 |" in text
    assert text.startswith("# Audit\n\n") and text.endswith("<!-- /results:privacy_audit -->\n\nAfter.\n")
    assert render.main(["--check"]) == 0
    (tmp_path / "results" / "privacy_audit.json").unlink()
    assert render.main([]) == 2 and page.read_text() == text
    assert capsys.readouterr().err.count("\n") == 1  # one line: the page, the block, the missing file
