"""Every shipped potential has a recipe that runs from scratch, stage by stage."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from qeq_ase.data.dataset import RMD17_MOLECULES
from qeq_ase.train.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes"


def stages(molecule: str) -> dict[str, TrainConfig]:
    return {path.stem: TrainConfig.from_yaml(path) for path in sorted((RECIPES / molecule).glob("*.yaml"))}


@pytest.mark.parametrize("molecule", RMD17_MOLECULES)
def test_each_shipped_molecule_has_a_recipe_chained_from_scratch(molecule):
    assert (ROOT / "potentials" / f"{molecule}_fp32.pt").is_file()
    recipe = stages(molecule)
    assert {"fp32", "int8"} <= set(recipe), molecule
    outputs = {cfg.output_dir: stage for stage, cfg in recipe.items()}
    for stage, cfg in recipe.items():
        assert cfg.output_dir == f"runs/recipes/{molecule}/{stage}", stage
        assert cfg.train_file == f"../shared/rmd17/rmd17_{molecule}_train_01.npz", stage
        if stage == "fp32":
            assert cfg.init_from is None, "the first stage starts from scratch"
        else:  # from an earlier stage of the same recipe, never from a shipped file
            assert cfg.init_from.endswith("/best.pt") and cfg.init_from[:-len("/best.pt")] in outputs, stage
    assert recipe["int8"].quantization is not None
    assert all(cfg.quantization is None for stage, cfg in recipe.items() if stage != "int8")
    # the stages form one chain: every stage but the last is the start of exactly one other
    starts = [cfg.init_from[:-len("/best.pt")] for cfg in recipe.values() if cfg.init_from]
    assert sorted(starts) == sorted(set(starts)) and len(starts) == len(recipe) - 1


def test_run_script_names_every_stage_of_each_recipe():
    script = (RECIPES / "run.sh").read_text()
    for molecule in RMD17_MOLECULES:
        order = "fp32 fp32_energy fp32_anneal int8" if molecule == "aspirin" else "fp32 int8"
        assert sorted(order.split()) == sorted(stages(molecule)), molecule
    assert 'aspirin) stages="fp32 fp32_energy fp32_anneal int8"' in script and '*) stages="fp32 int8"' in script


def test_recipe_configs_are_plain_option_mappings():
    for path in RECIPES.rglob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        assert set(data) <= set(TrainConfig.__dataclass_fields__), path


def _fake_commands(tmp_path: Path) -> dict:
    """An environment whose ``qeq-train`` and ``qeq-export`` log their arguments; the fake
    ``qeq-train`` writes a stage's run files, or fails on the stage named by ``FAIL_AT``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "qeq-train").write_text(
        '#!/usr/bin/env bash\necho "train $*" >> calls.log\n'
        '[ "$(basename "$1" .yaml)" = "${FAIL_AT:-}" ] && exit 1\n'
        'out=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))[\'output_dir\'])" "$1")\n'
        'mkdir -p "$out" && touch "$out/best.pt" "$out/final.pt"\n')
    (bin_dir / "qeq-export").write_text('#!/usr/bin/env bash\necho "export $*" >> calls.log\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_run_script_trains_stages_in_order_and_keeps_them_across_sessions(tmp_path):
    env = _fake_commands(tmp_path)
    clone = tmp_path / "clone"
    shutil.copytree(RECIPES, clone / "configs" / "recipes")
    run = ["bash", "configs/recipes/run.sh", "aspirin", "1"]

    def trained():
        calls = (clone / "calls.log").read_text().splitlines()
        (clone / "calls.log").unlink()
        return [Path(c.split()[1]).stem for c in calls if c.startswith("train")], calls

    # a first session ends during the third stage: the first two are kept in resume/
    assert subprocess.run(run, cwd=clone, env={**env, "FAIL_AT": "fp32_anneal"}).returncode != 0
    assert trained()[0] == ["fp32", "fp32_energy", "fp32_anneal"]
    assert sorted(p.name for p in (clone / "resume" / "aspirin").iterdir()) == ["fp32.pt", "fp32_energy.pt"]
    # the next session starts from a fresh clone: runs/ is gone, resume/ was committed
    shutil.rmtree(clone / "runs")
    subprocess.run(run, cwd=clone, env=env, check=True)
    stages, calls = trained()
    assert stages == ["fp32_anneal", "int8"]
    assert (clone / "runs/recipes/aspirin/fp32_energy/best.pt").is_file()  # restored for the third stage
    assert calls[-2].startswith("export runs/recipes/aspirin/fp32_anneal/best.pt ")
    assert calls[-1].startswith("export runs/recipes/aspirin/int8/best.pt ") and "--int8" in calls[-1]
    assert not (clone / "resume").exists()
