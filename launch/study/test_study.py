"""Checks of the study harness: study-file errors (each names its key and the fix), the sweep's expansion
into epic command lines, the Slurm job text, and a small study run end to end on the tiny preset with 1
and 2 CPU ranks (skipped, visibly, without an epic binary or mpirun). Run: python3 -m unittest discover
-s launch/study; EPIC_BINARY=path/to/epic selects the binary (default build/epic)."""

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import epic_results  # noqa: E402
import run_study  # noqa: E402
import study_file  # noqa: E402

REPO_ROOT = study_file.REPO_ROOT
EPIC = os.environ.get("EPIC_BINARY") or os.path.join(REPO_ROOT, "build", "epic")
HAVE_EPIC = os.path.isfile(EPIC) and os.access(EPIC, os.X_OK)
HAVE_MPIRUN = shutil.which("mpirun") is not None

# mpirun as root on a small machine (ENVIRONMENT.md); harmless where these are already set.
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_btl": "self,vader", "OMPI_MCA_pml": "ob1",
           "OMPI_MCA_btl_vader_single_copy_mechanism": "none"}


def study(**changes):
    base = {"format": "epic-study-v1", "name": "t", "command": "bench-moe",
            "args": {"preset": "configs/presets/tiny.json", "iterations": 1},
            "sweep": {"ranks": [1, 2], "tokens_per_rank": [8, 16]}}
    base.update(changes)
    return base


class StudyFileErrors(unittest.TestCase):
    """Each bad file fails with a StudyError whose message names the key and says what to write instead."""

    def assertError(self, data, *fragments):
        with self.assertRaises(study_file.StudyError) as caught:
            study_file.expand(study_file.parse_study(data, "s.json"))
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))

    def test_unknown_top_level_key_suggests_the_right_one(self):
        self.assertError({**study(), "sweeps": {}}, "unknown key 'sweeps'", "did you mean 'sweep'?")

    def test_wrong_type_names_the_axis_and_the_value(self):
        self.assertError(study(sweep={"ranks": [1, "four"]}), "sweep.ranks", "integers >= 1", '"four"')
        self.assertError(study(sweep={"ranks": 4}), "sweep.ranks must be a list", "[4]")
        self.assertError(study(sweep={"ranks": [1], "ep_overlap": ["yes"]}), "sweep.ep_overlap", "true or false")
        self.assertError(study(repeats=0), "repeats", "1 to 100")
        self.assertError(study(args=["preset"]), "args must be an object")

    def test_empty_sweep_and_empty_axis(self):
        self.assertError(study(sweep={}), "sweep is empty", "\"ranks\": [1, 2, 4]")
        self.assertError(study(sweep={"ranks": []}), "sweep.ranks is an empty list")

    def test_unknown_axis_and_misplaced_keys(self):
        self.assertError(study(sweep={"rank": [1]}), "sweep.rank: unknown axis", "did you mean 'ranks'?")
        self.assertError(study(args={"json": "x.json"}), "sets --json itself")
        self.assertError(study(args={"ranks": 2}), "is a sweep axis", "\"ranks\": [2]")
        self.assertError(study(sweep={"ranks": [1], "batch": [4]}), "applies to bench-decode, not bench-moe")
        self.assertError(study(sweep={"ranks": [1], "tokens_per_rank": [8], "total_tokens": [8]}), "weak", "strong")
        self.assertError(study(command="bench"), "command must be one of", "bench-moe")

    def test_points_that_cannot_exist(self):
        self.assertError(study(sweep={"ranks": [3], "total_tokens": [16]}), "does not split evenly over 3 ranks")
        self.assertError(study(sweep={"ranks": [3], "nodes": [2]}), "do not spread evenly over 2 nodes")

    def test_bad_file_text(self):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write('{"name": "x",\n "command": }')
        try:
            with self.assertRaises(study_file.StudyError) as caught:
                study_file.load_study(f.name)
            self.assertIn("not valid JSON at line 2", str(caught.exception))
        finally:
            os.unlink(f.name)


class SweepExpansion(unittest.TestCase):
    def test_product_in_file_order_with_flags(self):
        points = study_file.expand(study_file.parse_study(study(repeats=2), "s.json"))
        # 2 ranks x 2 token counts x 2 repeats; the last axis varies fastest, repeats innermost.
        self.assertEqual([(p.ranks, p.params["tokens_per_rank"], p.repeat) for p in points],
                         [(1, 8, 0), (1, 8, 1), (1, 16, 0), (1, 16, 1), (2, 8, 0), (2, 8, 1), (2, 16, 0), (2, 16, 1)])
        self.assertEqual(points[2].epic_args, ["bench-moe", "--preset", "configs/presets/tiny.json",
                                               "--iterations", "1", "--tokens-per-worker", "16"])
        self.assertEqual(len({p.point_id for p in points}), len(points))

    def test_strong_scaling_divides_the_total(self):
        points = study_file.expand(study_file.parse_study(study(sweep={"ranks": [1, 2, 4], "total_tokens": [64]}),
                                                          "s.json"))
        self.assertEqual([p.epic_args[-1] for p in points], ["64", "32", "16"])
        self.assertEqual(study_file.parse_study(study(sweep={"total_tokens": [64]}), "s").scaling, "strong")

    def test_replica_slots_nodes_and_booleans(self):
        # tiny has 8 experts: ceil(8 / 3) = 3 slots, + 2 spare = 5.
        data = study(sweep={"ranks": [3], "replica_slots": [2], "ep_overlap": [True, False]})
        points = study_file.expand(study_file.parse_study(data, "s.json"))
        self.assertIn("--slots", points[0].epic_args)
        self.assertEqual(points[0].epic_args[points[0].epic_args.index("--slots") + 1], "5")
        self.assertIn("--ep-overlap", points[0].epic_args)
        self.assertIn("--no-ep-overlap", points[1].epic_args)
        nodes = study_file.expand(study_file.parse_study(study(sweep={"ranks": [8], "ranks_per_node": [4]}), "s"))
        self.assertEqual((nodes[0].nodes, nodes[0].ranks_per_node), (2, 4))

    def test_exclude(self):
        data = study(sweep={"ranks": [1, 2], "ep_overlap": [False, True]}, exclude=[{"ranks": 1, "ep_overlap": True}])
        points = study_file.expand(study_file.parse_study(data, "s.json"))
        self.assertEqual([(p.ranks, p.params["ep_overlap"]) for p in points], [(1, False), (2, False), (2, True)])
        with self.assertRaises(study_file.StudyError) as caught:
            study_file.parse_study(study(exclude=[{"ranks": 3}]), "s.json")
        self.assertIn("exclude[0].ranks: 3 is not one of sweep.ranks's values [1, 2]", str(caught.exception))

    def test_yaml_gives_the_same_points(self):
        try:
            import yaml
        except ImportError:
            self.skipTest("PyYAML not importable: YAML study files are not supported here (JSON only)")
        data = study(sweep={"ranks": [1, 2], "tokens_per_rank": [8]})
        with tempfile.TemporaryDirectory() as folder:
            json_path, yaml_path = os.path.join(folder, "s.json"), os.path.join(folder, "s.yaml")
            with open(json_path, "w") as f:
                json.dump(data, f)
            with open(yaml_path, "w") as f:
                yaml.safe_dump(data, f, sort_keys=False)  # keep the axes in file order
            as_json = [p.epic_args for p in study_file.expand(study_file.load_study(json_path))]
            as_yaml = [p.epic_args for p in study_file.expand(study_file.load_study(yaml_path))]
        self.assertEqual(as_json, as_yaml)

    def test_slurm_job_text(self):
        data = study(sweep={"ranks": [8], "nodes": [2]}, slurm={"time": "00:05:00", "gpus_per_task": 1})
        parsed = study_file.parse_study(data, "s.json")
        point = study_file.expand(parsed)[0]
        text = run_study.job_script(parsed, point, "/bin/epic", "/tmp/out/points/" + point.point_id)
        for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks=8", "#SBATCH --ntasks-per-node=4",
                     "#SBATCH --time=00:05:00", "#SBATCH --gpus-per-task=1", "srun --mpi=pmix --ntasks=8 /bin/epic",
                     "echo \"$rc\" > /tmp/out/points/" + point.point_id + "/exit_code"):
            self.assertIn(line, text)
        # A local run across nodes needs hosts: a clear error, not a run on one node.
        with self.assertRaises(study_file.StudyError) as caught:
            run_study.local_launch(parsed, point, "/bin/epic", "/tmp/x", [])
        self.assertIn("--hostfile", str(caught.exception))


@unittest.skipUnless(HAVE_EPIC, f"no epic binary at {EPIC} (build it or set EPIC_BINARY): end-to-end study skipped")
@unittest.skipUnless(HAVE_MPIRUN, "mpirun not found (launch/setup_debian.sh installs OpenMPI): end-to-end study skipped")
class EndToEnd(unittest.TestCase):
    """The tiny preset on 1 and 2 CPU ranks, one point per rank count failing on purpose (tokens beyond
    bench-moe's bound): every point is recorded, the failures with epic's error."""

    @classmethod
    def setUpClass(cls):
        cls.folder = tempfile.mkdtemp(prefix="epic-study-test.")
        cls.study_path = os.path.join(cls.folder, "tiny.json")
        with open(cls.study_path, "w") as f:
            json.dump(study(name="tiny-e2e", args={"preset": "configs/presets/tiny.json", "iterations": 2,
                                                   "warmup": 1, "backend": "cpu", "threads": 1},
                            sweep={"ranks": [1, 2], "tokens_per_rank": [16, 99999]}, timeout_s=120), f)
        cls.out = os.path.join(cls.folder, "out")
        cls.done = subprocess.run([sys.executable, os.path.join(HERE, "run_study.py"), cls.study_path, "--epic", EPIC,
                                   "--out", cls.out], capture_output=True, text=True, timeout=600,
                                  env={**os.environ, **MPI_ENV})
        with open(os.path.join(cls.out, "results.json")) as f:
            cls.results = json.load(f)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.folder, ignore_errors=True)

    def test_every_point_is_recorded_and_failures_carry_the_error(self):
        self.assertEqual(self.done.returncode, 1, self.done.stderr)  # some points failed on purpose
        records = self.results["records"]
        self.assertEqual(sorted((r["ranks"], r["tokens_per_rank"], r["status"]) for r in records),
                         [(1, 16, "ok"), (1, 99999, "failed"), (2, 16, "ok"), (2, 99999, "failed")])
        for r in records:
            if r["status"] == "failed":
                self.assertIn("--tokens-per-worker", r["error"])
            for key in ("host", "card", "mpi_version", "epic_version", "date", "command"):
                self.assertTrue(r.get(key), f"{key} missing in {r['point']}")
            self.assertIn(f"-n {r['ranks']}", r["command"])
        with open(os.path.join(self.out, "results.csv")) as f:
            self.assertEqual(len(list(csv.DictReader(f))), len(records))

    def test_figures_are_epics_own(self):
        # The flattened figures against the raw bench-moe file of the same point, recomputed here.
        for r in self.results["records"]:
            if r["status"] != "ok":
                continue
            with open(os.path.join(self.out, "points", r["point"], "result.json")) as f:
                raw = json.load(f)
            workers = raw["per_worker"]
            self.assertEqual(len(workers), r["ranks"])
            self.assertEqual(r["layer_ms"], max(w["total_ms"] for w in workers))
            self.assertEqual(r["dispatch_ms_max"], max(w["dispatch_ms"] for w in workers))
            rows = [w["rows_computed"] for w in workers]
            self.assertAlmostEqual(r["load_balance"], max(rows) / (sum(rows) / len(rows)), places=12)
            self.assertEqual(r["wrong"], 0)
            # Every (token, slot) row of the job is computed once: 2 slots a token in tiny.
            self.assertEqual(sum(rows), r["ranks"] * 16 * 2)

    def test_plots_are_written(self):
        if shutil.which("gnuplot") is None:
            self.skipTest("gnuplot not found (launch/setup_debian.sh installs gnuplot-nox): plots skipped")
        plots = os.path.join(self.folder, "plots")
        done = subprocess.run([sys.executable, os.path.join(HERE, "plot_study.py"),
                               os.path.join(self.out, "results.json"), "--out", plots],
                              capture_output=True, text=True, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        for name in ("phases_vs_ranks.png", "tokens_per_s.png", "scaling_efficiency.png", "load_balance.png",
                     "bytes_per_link.png"):
            with open(os.path.join(plots, name), "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n", name)

    def test_a_flag_this_epic_lacks_is_named(self):
        path = os.path.join(self.folder, "dispatch.json")
        with open(path, "w") as f:
            json.dump(study(name="x", sweep={"ranks": [1], "--no-such-flag": [1]}), f)
        done = subprocess.run([sys.executable, os.path.join(HERE, "run_study.py"), path, "--epic", EPIC,
                               "--out", os.path.join(self.folder, "never")], capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 2)
        self.assertIn("sweep.--no-such-flag asks for --no-such-flag", done.stderr)


class ResultParsing(unittest.TestCase):
    def test_not_a_bench_file(self):
        with self.assertRaises(ValueError) as caught:
            epic_results.bench_moe_rows({"format": "something"}, "x.json")
        self.assertIn("x.json: not a bench-moe --json file", str(caught.exception))

    def test_decode_lines(self):
        rows = epic_results.bench_decode_rows([{"name": "load", "seconds": 2.0, "resident_bytes": 5},
                                               {"name": "decode", "batch": 4, "ms_per_step": 2.5,
                                                "tokens_per_s": 1600.0}], "d.json")
        self.assertEqual(rows, [{"kind": "decode", "batch": 4, "ms_per_step": 2.5, "tokens_per_s": 1600.0,
                                 "layers": None, "prompt_tokens": None, "new_tokens": None, "graphs": None,
                                 "load_s": 2.0, "resident_bytes": 5}])


if __name__ == "__main__":
    unittest.main()
