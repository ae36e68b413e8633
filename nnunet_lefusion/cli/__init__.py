"""Thin ``nnUNetv2_lefusion_*`` entry points: parse, validate, call the library, report errors in one line."""
