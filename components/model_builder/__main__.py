import sys

from components.model_builder.cli import main

sys.exit(main(sys.argv[1:]))
