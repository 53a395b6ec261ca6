"""What users and torchtitan call: ``compile`` (and ``split_for_program``), ``split`` and
``plan``, re-exported by ``dualpipe_fx``. May import every layer below (runtime, planning,
schedules, passes)."""
