"""For people: the ``dualpipe-fx`` command line (``cli``), the ``run`` demo and ``visualize``
(which needs planning only)."""
