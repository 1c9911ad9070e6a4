r"""Rate study of the kernel score estimator and its diffusion sampler.

  python -m eval.study --config=configs/score/rates.py:demo --workdir=runs/demo_score
  python -m eval.study --config=configs/score/rates.py --workdir=runs/score_rates

demo (part of `make demo`): E1 (mixture, d = 1, t = 0.01 and 0.1, n = 1k..64k,
10 seeds), E3 (all three targets, 10 seeds), E4 (samplers vs the closed form),
E5 (kernel vs neural, mixture and biweight, n = 250 and 1000, 3 seeds),
E6 (ablations: truncation, c_rho, Legendre);
measured 3 min 1 s on 2 cores.
Expected: E1 slopes about -0.9 (goal -1 ± 0.25), E3 slopes -0.38..-0.41
(goal -0.4 ± 0.1).
full: measured 36 min on 2 cores (sharing the machine with a test run);
the result is in eval/score_rates/report.md.
default (full): adds d = 2 (E1, E3), t = 1, every target in E1, E2 and E5,
n = 4000 and 5 seeds in E5.
tiny: seconds (tests).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "score"
  ns = (1000, 4000, 16000, 64000)
  c.study = dict(
      title="Kernel score estimation and minimax diffusion sampling: rates",
      e1=dict(enabled=True, targets=("mixture", "biweight", "x2gauss"),
              dims=(1, 2), ts=(0.01, 0.1, 1.0), ns=ns, seeds=10,
              n_eval=10_000),
      e2=dict(enabled=True, targets=("mixture",), dims=(1, 2), n=16000,
              ts=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0), seeds=5,
              n_eval=10_000),
      e3=dict(enabled=True, targets=("mixture", "biweight", "x2gauss"),
              dims=(1, 2), ns=ns, seeds=10, beta=2.0),
      e4=dict(enabled=True, target="mixture", n=4000, num=8000, steps=200,
              methods=("bridge", "em", "ei", "ode_ei")),
      e5=dict(enabled=True, targets=("mixture", "biweight", "x2gauss"),
              ns=(250, 1000, 4000), seeds=5,
              ts=(0.01, 0.1, 1.0), t_int_max=10.0, t_int_points=12,
              n_eval=10_000, hidden=(128, 128, 128), steps=3000,
              batch_size=256, learning_rate=2e-3, sample_steps=200,
              sample_num=10_000, sample_ref=200_000),
      e6=dict(enabled=True, target="mixture", dim=1, n=4000, seeds=5,
              ts=(0.01, 0.1), n_eval=4000, variants=(
                  dict(label="empirical, untruncated", truncate=False),
                  dict(label="empirical, c_rho=0.1", c_rho=0.1),
                  dict(label="empirical, c_rho=1", c_rho=1.0),
                  dict(label="empirical, c_rho=10", c_rho=10.0),
                  dict(label="legendre, C=1", estimator="legendre"),
                  dict(label="legendre, C=2, order 2", estimator="legendre",
                       C=2.0, order=2),
              )),
  )
  if arg == "demo":
    c.study.title += " (demo)"
    c.study.e1.targets = ("mixture",)
    c.study.e1.dims = (1,)
    c.study.e1.ts = (0.01, 0.1)
    c.study.e2.enabled = False
    c.study.e3.dims = (1,)
    c.study.e5.ns = (250, 1000)
    c.study.e5.seeds = 3
    c.study.e5.targets = ("mixture", "biweight")
  elif arg == "tiny":
    c.study.title += " (tiny)"
    c.study.e1.update(targets=("mixture",), dims=(1,), ts=(0.1,),
                      ns=(200, 800), seeds=2, n_eval=500)
    c.study.e2.update(dims=(1,), n=500, ts=(0.03, 0.1, 1.0), seeds=2,
                      n_eval=500)
    c.study.e3.update(targets=("mixture", "x2gauss"), dims=(1, 2),
                      ns=(200, 800), seeds=2)
    c.study.e4.update(n=300, num=500, steps=20, methods=("bridge", "ei"))
    c.study.e6.update(n=300, seeds=2, ts=(0.1,), n_eval=300)
    c.study.e5.update(targets=("mixture",), ns=(100,), seeds=1, steps=20, hidden=(16,),
                      t_int_points=3, n_eval=500, sample_steps=10,
                      sample_num=500, sample_ref=2000)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use demo, tiny or nothing")
  return c
