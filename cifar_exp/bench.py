"""`python -m cifar_exp.bench`: cifar_exp.tools.bench's command, under the name users type."""

from cifar_exp.tools.bench import main

if __name__ == "__main__":
    main()
