"""torchtitan integration of dualpipe_fx."""
