"""The captioner web UI: `python app.py`, then open http://127.0.0.1:7860.

The same as `captioner app`; see --help. Flags override environment variables, which override
the defaults (the shipped model).
"""

from captioner.cli.main import alias

main = alias("app")

if __name__ == "__main__":
    main()
