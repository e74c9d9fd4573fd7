"""Campaigns: grids of runs from a sweep file, run over one worker pool, and their record.

Owns: `spec` (a sweep file parsed and expanded into cells), `sweep` (building streams, running
cells, resuming; the `sweep` command), `campaign` (the campaign record: table with intervals,
paired tests, selection, report).

May import every other room of `pipeline`; nothing imports this room but the CLI.
"""
