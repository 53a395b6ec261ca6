"""What users and torchtitan call: ``compile``, ``split`` (and ``split_for_program``), ``plan`` and
``autoplan``, re-exported by ``dualpipe_fx``. May import every layer below (runtime, planning,
schedules, passes)."""
