import sys

from cape_ray.cli import main

sys.exit(main())
