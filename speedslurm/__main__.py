from speedslurm.cli import main

main()
