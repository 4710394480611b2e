"""``python -m sb3_offtrc.zoo train|enjoy|optimize ...`` (see :mod:`sb3_offtrc.zoo.cli`)."""

from sb3_offtrc.zoo.cli import main

if __name__ == "__main__":
    main()
