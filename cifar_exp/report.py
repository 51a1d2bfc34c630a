"""`python -m cifar_exp.report`: cifar_exp.tools.report's command, under the name users type."""

from cifar_exp.tools.report import main

if __name__ == "__main__":
    main()
