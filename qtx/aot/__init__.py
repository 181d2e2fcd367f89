"""Ahead-of-time compilation for accelerators this host does not have.

  topology   TPU topologies as compile-only devices (libtpu, no TPU needed)
  programs   the config's programs as shapes: train step, eval encoders, PTQ programs
  report     compile one program: planned memory, cost model, collectives, roofline
  hlo        the compiled module's text: how often each op runs, collectives, bytes per part
  fit        microbatches that make the train step fit; the largest per-chip batch that fits

Compile mode (`--config.mode=compile`, qtx.modes.compile) drives them.
"""
