"""The trade-off study on top of every role: the sweep of real runs (`sweep`), its rows (`rows`), the plots
(`plots`) and the recommendation (`recommend`)."""
