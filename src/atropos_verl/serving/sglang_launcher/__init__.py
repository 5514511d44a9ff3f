"""The SGLang server's entry point (``launch.py``), run by path in SGLang's own venv."""
