"""Whole scenes of any size: tiles, streamed I/O, resumable runs, a task engine."""
