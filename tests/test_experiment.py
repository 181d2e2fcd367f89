"""The sweep's result table: mean +- sample std over seeds, missing values as '-'."""
from qtx import experiment


def test_table_mean_and_std_over_seeds():
  runs = {"softmax": [{"eval/zeroshot_top1": 0.40, "outliers/max_inf_norm": 10.0},
                      {"eval/zeroshot_top1": 0.50, "outliers/max_inf_norm": 14.0}],
          "gated": [{"eval/zeroshot_top1": 0.391}]}
  cols = (("eval/zeroshot_top1", "zs", 100.0), ("outliers/max_inf_norm", "inf", 1.0))
  t = experiment.table(runs, cols).splitlines()
  assert t[0] == "| normalizer | seeds | zs | inf |"
  assert t[2] == "| softmax | 2 | 45.0 ± 7.1 | 12 ± 2.8 |"  # std with ddof=1
  assert t[3] == "| gated | 1 | 39.1 | - |"


def test_set_parses_python_literals(tmp_path):
  from qtx import config_lib
  c = config_lib.tiny_config()
  experiment._set(c, "train.lr=0.01")
  experiment._set(c, "mesh.num_devices=1")
  experiment._set(c, "data.name=synthetic")
  assert c.train.lr == 0.01 and c.mesh.num_devices == 1 and c.data.name == "synthetic"
