"""``unilora demo``: the project's main jobs end to end on real models and real text,
offline (models and data come from installed packages).

* :mod:`.classifier`: all-MiniLM-L6-v2 learns movie-review sentiment (the default);
* :mod:`.workdir`: the demo's work folder, which only ever replaces what a demo wrote.
"""
