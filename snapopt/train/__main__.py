from snapopt.train.cli import main

main()
