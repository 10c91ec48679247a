import sys

from contimg_publisher.cli import main

sys.exit(main())
