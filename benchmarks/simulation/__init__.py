"""The scale model behind `python -m benchmarks.simulate`: the real sans-IO sender and receivers on a simulated link.

* `model`: one scenario (receivers, loss model, join times) run with explicit time; the real `Carousel`,
  `Assembly` and `RepairPlanner`, and a sender link of a given rate.
* `fec`: a counting model of per-frame NACK repair versus per-block parity (FEC), for the same loss models.
"""
