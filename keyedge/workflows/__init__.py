"""Workflows: one function per command, which the CLI, the demo (and the fleet) call alike.

Each reads its inputs, refuses bad ones before any expensive work, runs the layers below (training,
deploy, red team, checks) and writes its outputs atomically, reporting through an ``echo``
(:mod:`keyedge.core.progress`). The demo (:mod:`.demo`) is the main job built from them.
"""
