"""`python -m cifar_exp.gpucheck`: cifar_exp.tools.gpucheck's command, under the name users type."""

from cifar_exp.tools.gpucheck import main

if __name__ == "__main__":
    main()
